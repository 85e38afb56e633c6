"""Objects fetched, verified and written to the cache by worker processes, so a mount's
FUSE threads never wait for the interpreter behind a download: the bytes are the
repository's, a tampered or missing object is refused there exactly as in the mount's
own process, and a worker that dies is replaced without the reader noticing."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_client.cache import ObjectCache, lock_cache_dir, wait_until_free
from cvmfs_client.errors import FetchError
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
        os.kill(worker.pid, signal.SIGKILL)
    for name in ("f1.bin", "f2.bin", "f3.bin"):
        assert content(reader, f"/sw/{name}") == published[name]
    assert pool.restarts >= 1  # a dead worker is found when it is next given work


def test_workers_exit_with_the_pool(reader: RepositoryReader) -> None:
    pool = reader.pool
    assert pool is not None
    workers = list(pool._all)
    pool.close()
    assert [w.status for w in workers] == [0, 0]


def test_workers_started_once_threads_run_are_fresh_interpreters(
    reader: RepositoryReader, published: dict[str, bytes], repo: Repo
) -> None:
    """Forking is safe only while the mount has one thread; later workers (a
    replacement, a pool made beside threads) are spawned, and work the same."""
    assert reader.cache is not None
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        spawned = FetchPool(DirectoryFetcher(str(repo.dir)), reader.cache.tmp, workers=1)
    finally:
        stop.set()
        other.join()
    reader.pool, forked = spawned, reader.pool
    try:
        with open(f"/proc/{spawned._all[0].pid}/cmdline", "rb") as f:
            assert b"fetch_pool" in f.read()  # a fresh interpreter running the worker
        assert content(reader, "/sw/f5.bin") == published["f5.bin"]
    finally:
        spawned.close()
        reader.pool = forked


def test_a_worker_never_keeps_the_cache_directory_locked(
    repo: Repo, tmp_path: Path, published: dict[str, bytes]
) -> None:
    """A worker outliving its mount (stuck in a download) must not keep the next mount
    off the cache: forked workers close their copy of the cache directory's lock."""
    cache_dir = tmp_path / "locked"
    lock = lock_cache_dir(str(cache_dir))
    cache = ObjectCache(str(cache_dir / "objects"))
    pool = FetchPool(DirectoryFetcher(str(repo.dir)), cache.tmp, workers=2)
    stuck = pool._all[0].pid
    os.kill(stuck, signal.SIGSTOP)
    try:
        os.close(lock)  # the mount's daemon is gone
        assert wait_until_free(str(cache_dir), 2)
    finally:
        os.kill(stuck, signal.SIGCONT)
        pool.close()


def test_with_no_worker_left_the_reader_fetches_in_its_own_process(
    reader: RepositoryReader, published: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers killed and none can be started again (here: no interpreter to spawn):
    reads still work, fetched by the mount's own process."""
    pool = reader.pool
    assert pool is not None
    monkeypatch.setattr("sys.executable", "/nonexistent/python3")
    for worker in list(pool._all):
        os.kill(worker.pid, signal.SIGKILL)
    for name in ("f1.bin", "f2.bin"):
        assert content(reader, f"/sw/{name}") == published[name]
    assert pool._all == []


def test_a_cache_a_worker_cannot_write_to_fails_the_fetch_clearly(
    repo: Repo, tmp_path: Path, published: dict[str, bytes]
) -> None:
    not_a_directory = tmp_path / "tmp-is-a-file"
    not_a_directory.write_bytes(b"")
    pool = FetchPool(DirectoryFetcher(str(repo.dir)), str(not_a_directory), workers=1)
    try:
        reader = open_reader(repo)
        entry = reader.lookup("/sw/f0.bin")
        assert entry.hash is not None
        with pytest.raises(FetchError, match="cannot write to the cache"):
            pool.fetch(entry.hash, entry.size)
    finally:
        pool.close()
