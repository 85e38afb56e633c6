"""One conformance suite for every place a publisher puts objects (cvmfs_format.store):
a local directory, an S3 bucket (on a moto server), uploads through the publish API of a
real `repo-server serve`, and a dry run. Each stores an object once, answers "which are
missing" exactly, and refuses bytes that are not the object they are named as."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from cvmbuild.errors import BuildError
from cvmbuild.publish import DryRunSink
from cvmbuild.remote import Gateway, UploadStorage
from cvmfs_format.errors import CvmfsError, FormatError, VerificationError
from cvmfs_format.objects import ZSTD_MAGIC, content_hash, decode_object, encode_object
from cvmfs_format.store import ObjectSink, Storage
from repo_server.s3_storage import S3Storage, make_client
from repo_server.storage import LocalStorage
from tests.conftest import Repo, run_cli, serving
from tests.test_s3 import PREFIX, _aws_environment, endpoint, new_bucket  # noqa: F401

KINDS = ["local", "s3", "upload", "dry-run"]
COMPRESSOR = zstandard.ZstdCompressor(level=3)


@dataclass
class Sink:
    """An ObjectSink under test, what stands behind it, and how to finish its writes."""

    sink: ObjectSink
    behind: Storage  # where its objects end up (for a dry run: where they would)
    flush: Callable[[], None]
    writes: bool = True


@pytest.fixture(params=KINDS)
def sink(request: pytest.FixtureRequest, repo: Repo, tmp_path: Path) -> Iterator[Sink]:
    local = LocalStorage(repo.dir)
    if request.param == "local":
        yield Sink(local, local, lambda: None)
    elif request.param == "s3":
        url = request.getfixturevalue("endpoint")
        storage = S3Storage(new_bucket(url), PREFIX, make_client(url))
        yield Sink(storage, S3Storage(storage.bucket, PREFIX, make_client(url)), lambda: None)
    elif request.param == "dry-run":
        yield Sink(DryRunSink(local.missing), local, lambda: None, writes=False)
    else:
        token = run_cli("repo-server", "token", "add", repo.dir, "--name", "ci", "--path", "/sw")
        with serving(repo.dir, tmp_path / "serve.log") as url:
            gateway = Gateway(url, token.stdout.decode().strip(), sleep=lambda s: None)
            with gateway.lease("/sw/conformance") as lease:
                upload = UploadStorage(gateway, lease)
                try:
                    yield Sink(upload, local, upload.flush)
                finally:
                    upload.close()


def objects(count: int, seed: int = 1) -> dict[str, bytes]:
    """Stored forms by name: compressible ones stored as zstd, random ones raw."""
    rng = random.Random(seed)
    result = {}
    for i in range(count):
        content = rng.randbytes(300) if i % 2 else b"muon track %d " % i * 40
        result[content_hash(content)] = encode_object(content, COMPRESSOR)
    return result


def test_an_object_put_once_is_stored_once_and_reads_back(sink: Sink) -> None:
    stored = objects(6)
    digests = list(stored)
    assert sink.sink.missing(digests) == set(digests)
    for digest, data in stored.items():
        assert sink.sink.put_object(digest, data) is True
    for digest, data in stored.items():
        assert sink.sink.put_object(digest, data) is False  # already there: not again
    sink.flush()
    assert sink.sink.missing(digests) == set()
    assert all(sink.sink.has(d) for d in digests)
    behind = sink.behind.missing(digests)
    if not sink.writes:
        assert behind == set(digests)  # a dry run changes nothing
        return
    assert behind == set()
    for digest, data in stored.items():
        assert decode_object(sink.behind.get_object(digest), digest) == decode_object(data, digest)


def test_missing_answers_exactly_for_many_objects_in_one_directory(sink: Sink) -> None:
    # Many names in one data/xx/ directory: storages list a directory instead of asking
    # about each name past a threshold; both ways must give the same answer.
    many = {}
    for i in range(5000):
        content = b"chunk %d" % i
        digest = hashlib.sha256(content).hexdigest()
        if digest.startswith("ab"):
            many[digest] = encode_object(content, COMPRESSOR)
    assert len(many) >= 10
    present = dict(list(many.items())[::2])
    for digest, data in present.items():
        sink.sink.put_object(digest, data)
    sink.flush()
    assert sink.sink.missing(many) == set(many) - set(present)


def forged_objects() -> dict[str, tuple[str, bytes]]:
    """Stored bytes that are not the object they are named as."""
    content = b"print('the real module')\n" * 20
    digest = content_hash(content)
    good = encode_object(content, COMPRESSOR)
    bomb = COMPRESSOR.compress(b"\0" * (64 << 20))  # 64 MiB of content in a few KiB
    return {
        "another object's bytes": (digest, encode_object(b"something else", COMPRESSOR)),
        "a flipped byte": (digest, good[:-1] + bytes([good[-1] ^ 1])),
        "a truncated frame": (digest, good[: len(good) // 2]),
        "not zstd after the magic": (digest, ZSTD_MAGIC + b"garbage" * 10),
        "a decompression bomb under a small name": (content_hash(b"tiny"), bomb),
    }


@pytest.mark.parametrize("forgery", list(forged_objects()))
def test_bytes_that_are_not_their_name_are_refused_and_not_stored(sink: Sink, forgery: str) -> None:
    digest, data = forged_objects()[forgery]
    with pytest.raises((VerificationError, BuildError)) as refused:
        sink.sink.put_object(digest, data)
        sink.flush()
    assert "object" in str(refused.value) or "rejected" in str(refused.value)
    assert sink.behind.missing([digest]) == {digest}


def test_a_name_that_is_not_an_object_name_is_refused(sink: Sink) -> None:
    for name in ("../../manifest", "AB" * 32, "ab" * 31, ""):
        with pytest.raises((FormatError, BuildError, CvmfsError)):
            sink.sink.missing([name])
            sink.flush()


# -- what only storages do (local directory, S3) ----------------------------------------


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, repo: Repo) -> Storage:
    if request.param == "local":
        return LocalStorage(repo.dir)
    url = request.getfixturevalue("endpoint")
    return S3Storage(new_bucket(url), PREFIX, make_client(url))


def test_a_storage_lists_deletes_and_dates_its_objects(storage: Storage) -> None:
    stored = objects(4, seed=2)
    for digest, data in stored.items():
        storage.put_object(digest, data)
    listed = dict(storage.iter_objects())
    assert {d: listed[d] for d in stored} == {d: len(data) for d, data in stored.items()}
    for digest, data in stored.items():
        assert storage.object_head(digest, 8) == (data[:8], len(data))
    victim = next(iter(stored))
    assert storage.object_mtime(victim) > 0
    storage.delete_object(victim)
    assert storage.missing(stored) == {victim}
    with pytest.raises(FileNotFoundError):
        storage.get_object(victim)
    with pytest.raises(FileNotFoundError):
        storage.object_head(victim, 8)


def test_a_storage_replaces_its_top_level_files_whole(storage: Storage) -> None:
    assert storage.read_file("conformance-note") is None
    storage.write_file("conformance-note", b"first\n")
    storage.write_file("conformance-note", b"second, longer\n")
    assert storage.read_file("conformance-note") == b"second, longer\n"
