"""Objects fetched, verified and written to the cache by worker processes, so a mount's
FUSE threads never wait for the interpreter behind a download: the bytes are the
repository's, a tampered or missing object is refused there exactly as in the mount's
own process, and a worker that dies is replaced without the reader noticing."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_client.cache import ObjectCache
from cvmfs_client.fetch_pool import FetchPool
from cvmfs_client.fetcher import DirectoryFetcher
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.errors import NotFoundError, VerificationError
from cvmfs_format.objects import object_path
from tests.conftest import Repo, open_reader, run_cli


@pytest.fixture
def published(repo: Repo, tmp_path: Path) -> dict[str, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(1000 + 4096 * i) for i in range(6)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw")
    return files


@pytest.fixture
def reader(repo: Repo, tmp_path: Path, published: dict[str, bytes]) -> Iterator[RepositoryReader]:
    cache = ObjectCache(str(tmp_path / "cache"))
    reader = open_reader(repo, cache=cache)
    reader.pool = FetchPool(DirectoryFetcher(str(repo.dir)), cache.tmp, workers=2)
    yield reader
    reader.pool.close()


def content(reader: RepositoryReader, path: str) -> bytes:
    return b"".join(reader.iter_content(reader.lookup(path)))


def test_workers_fetch_verify_and_cache_what_is_read(
    reader: RepositoryReader, published: dict[str, bytes]
) -> None:
    cache = reader.cache
    assert cache is not None
    reader.listdir("/sw")  # its catalogs, fetched in this process
    catalogs = cache.stats.misses
    for name, data in published.items():
        assert content(reader, f"/sw/{name}") == data
    assert cache.stats.misses - catalogs == len(published)
    for data in published.values():
        digest = hashlib.sha256(data).hexdigest()
        assert Path(cache.path(digest)).read_bytes() == data
    assert os.listdir(cache.tmp) == []  # every staged file renamed into place
    assert content(reader, "/sw/f0.bin") == published["f0.bin"]
    assert cache.stats.hits >= 1 and cache.stats.misses - catalogs == len(published)


def test_a_tampered_object_is_refused_and_nothing_is_cached(
    reader: RepositoryReader, published: dict[str, bytes], repo: Repo
) -> None:
    entry = reader.lookup("/sw/f3.bin")
    assert entry.hash is not None
    stored = repo.dir / object_path(entry.hash)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        content(reader, "/sw/f3.bin")
    assert reader.cache is not None and entry.hash not in reader.cache
    assert os.listdir(reader.cache.tmp) == []
    assert content(reader, "/sw/f2.bin") == published["f2.bin"]  # the worker goes on


def test_a_missing_object_is_not_found(
    reader: RepositoryReader, published: dict[str, bytes], repo: Repo
) -> None:
    entry = reader.lookup("/sw/f4.bin")
    assert entry.hash is not None
    (repo.dir / object_path(entry.hash)).unlink()
    with pytest.raises(NotFoundError):
        content(reader, "/sw/f4.bin")


def test_a_killed_worker_is_replaced_and_no_read_fails(
    reader: RepositoryReader, published: dict[str, bytes]
) -> None:
    pool = reader.pool
    assert pool is not None
    assert content(reader, "/sw/f0.bin") == published["f0.bin"]
    for worker in list(pool._all):
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    for name in ("f1.bin", "f2.bin", "f3.bin"):
        assert content(reader, f"/sw/{name}") == published[name]
    assert pool.restarts >= 1  # a dead worker is found when it is next given work


def test_workers_exit_with_the_pool(reader: RepositoryReader) -> None:
    pool = reader.pool
    assert pool is not None
    processes = [w.process for w in pool._all]
    pool.close()
    assert [p.returncode for p in processes] == [0, 0]
