"""A repository in an S3 bucket (moto on loopback): the operator creates it, a build script
publishes into it, clients read it straight from the bucket's HTTP endpoint, and
`check` finds what was tampered with, as for a repository directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import zstandard

from cvmfs_client.fetcher import fetcher_for
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.objects import (
    HEADER_BYTES,
    content_hash,
    declared_content_size,
    encode_object,
    object_path,
)
from cvmfs_format.signed import load_public_key_pem
from cvmfs_format.trust import TrustedState
from repo_server import s3_storage
from repo_server.repository import LocalRepository
from repo_server.s3_storage import S3Storage, make_client
from repo_server.storage import LocalStorage
from tests.conftest import (
    BIN,
    MiB,
    Repo,
    backdate_history,
    free_port,
    mounted,
    read_back,
    read_tree,
    run_cli,
    write_build_tree,
)
from tests.test_publish_roundtrip import MTIME_NS, make_build_tree, source_entries

NAME = "s3.example.org"
PREFIX = "cvmfs/sw"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port for this module's tests."""
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-p", url.rpartition(":")[2]],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto_server exited: {log.read_text()}"
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"moto_server silent on {url}"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def _aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials moto accepts, and none of the user's AWS settings."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def public_read_policy(bucket: str, prefix: str) -> str:
    """Anyone may GET the repository's files, nothing else (docs/OPERATING.md)."""
    statement = {
        "Sid": "PublicReadRepository",
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*",
    }
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


@dataclass
class S3Repo:
    endpoint: str
    bucket: str
    keys: Path

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{PREFIX}"

    @property
    def url(self) -> str:
        """Where clients read it: the bucket's HTTP endpoint (path style)."""
        return f"{self.endpoint}/{self.bucket}/{PREFIX}"

    @property
    def pub(self) -> Path:
        return self.keys / f"{NAME}.pub"

    @property
    def options(self) -> tuple[str, ...]:
        return ("--keys", str(self.keys), "--endpoint-url", self.endpoint)

    def s3(self) -> Any:
        return make_client(self.endpoint)

    def storage(self) -> S3Storage:
        return S3Storage(self.bucket, PREFIX, self.s3())

    def keys_in_bucket(self) -> set[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", ())}


def new_bucket(endpoint: str, *, public: bool = True) -> str:
    """A bucket as an operator prepares it: created, and readable by anyone if public."""
    bucket = f"repo-{uuid.uuid4().hex[:12]}"
    client = make_client(endpoint)
    client.create_bucket(Bucket=bucket)
    if public:
        client.put_bucket_policy(Bucket=bucket, Policy=public_read_policy(bucket, PREFIX))
    return bucket


@pytest.fixture
def s3_repo(endpoint: str, tmp_path: Path) -> S3Repo:
    repo = S3Repo(endpoint, new_bucket(endpoint), tmp_path / "keys")
    out = run_cli("repo-server", "init", repo.location, "--name", NAME, *repo.options)
    assert f"in {repo.location} (revision 0)" in out.stdout.decode()
    return repo


def publish(src: Path, repo: S3Repo, path: str, *extra: str) -> str:
    """The build script's one line, with an S3 repository."""
    result = run_cli(
        "cvmbuild", "publish", src, "--repo", repo.location, "--path", path, *repo.options, *extra
    )
    return result.stdout.decode()


def open_reader(repo: S3Repo) -> RepositoryReader:
    """A verifying reader of the bucket's HTTP endpoint, pinned to the master key."""
    key = load_public_key_pem(repo.pub.read_bytes(), str(repo.pub))
    reader = RepositoryReader(fetcher_for(repo.url), TrustedState(key, repo.pub.stem))
    reader.load_manifest()
    return reader


def client(repo: S3Repo, command: str, path: str, *extra: str, check: bool = True) -> bytes:
    result = run_cli(
        "cvmfs-client", command, repo.url, path, "--key", repo.pub, *extra, check=check
    )
    return result.stdout if check else result.stderr


# -- publish and read -----------------------------------------------------------------


def test_a_published_tree_reads_back_from_the_bucket(s3_repo: S3Repo, tmp_path: Path) -> None:
    tree = write_build_tree(
        tmp_path / "src", seed=5, small_files=120, big_files=1, big_size=5 * MiB
    )

    out = publish(tmp_path / "src", s3_repo, "/sw/1.0", "--tag", "v1.0")

    assert re.match(rf"published revision 1 at /sw/1.0: {len(tree)} files", out), out
    assert read_tree(open_reader(s3_repo), "/sw/1.0") == tree
    big = "data/calib0.bin"
    assert client(s3_repo, "cat", f"/sw/1.0/{big}") == tree[big]
    names = client(s3_repo, "ls", "/sw/1.0").decode().split()
    assert names == sorted({p.split("/")[0] for p in tree})
    tags = run_cli("repo-server", "tags", s3_repo.location, *s3_repo.options).stdout.decode()
    assert tags.startswith("v1.0\trevision 1\t")
    # The publish lock lives beside the keys on the publishing host.
    assert (s3_repo.keys / f"s3-{s3_repo.bucket}-cvmfs-sw.lock").exists()


def test_every_kind_of_entry_reads_back_exactly(s3_repo: S3Repo, tmp_path: Path) -> None:
    """The round trip of test_publish_roundtrip.py, through a bucket."""
    src = tmp_path / "build"
    make_build_tree(src)
    publish(src, s3_repo, "/sw")

    reader = open_reader(s3_repo)
    assert reader.lookup("/sw").mtime_ns == MTIME_NS
    for relpath, st in source_entries(src).items():
        entry = reader.lookup(f"/sw/{relpath}")
        assert (entry.mode, entry.mtime_ns) == (st.st_mode, st.st_mtime_ns), relpath
        if stat.S_ISLNK(st.st_mode):
            assert entry.target == os.readlink(src / relpath), relpath
        elif stat.S_ISREG(st.st_mode):
            assert read_back(reader, entry.path) == (src / relpath).read_bytes(), relpath
        else:
            assert [e.name for e in reader.listdir(entry.path)] == sorted(os.listdir(src / relpath))
    assert reader.link_count(reader.lookup("/sw/hard/a")) == 2


def test_publishing_again_uploads_nothing_new(
    s3_repo: S3Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_build_tree(tmp_path / "src", seed=6, small_files=60, big_files=1, big_size=5 * MiB)
    publish(tmp_path / "src", s3_repo, "/sw")
    before = s3_repo.keys_in_bucket()
    bookkeeping: set[str] = set()

    def publish_again() -> str:
        out = publish(tmp_path / "src", s3_repo, "/sw")
        manifest = open_reader(s3_repo).manifest
        assert manifest is not None
        bookkeeping.update({manifest.history_hash, manifest.root_hash})
        return out

    again = publish_again()
    # A fresh build machine: no stat cache, every file read and asked about again.
    monkeypatch.setenv("CVMBUILD_CACHE_DIR", str(tmp_path / "other-machine-cache"))
    fresh = publish_again()

    for out in (again, fresh):
        assert re.search(r"\(0 objects, 0 catalogs\); dedup 100.0%", out), out
    added = s3_repo.keys_in_bucket() - before
    # Only the bookkeeping of each new revision itself is written.
    assert added <= {f"{PREFIX}/{object_path(digest)}" for digest in bookkeeping}


# -- what a web client sees -----------------------------------------------------------


def test_the_bucket_serves_objects_for_caching_forever_and_the_manifest_briefly(
    s3_repo: S3Repo,
) -> None:
    head = open_reader(s3_repo).manifest
    assert head is not None
    obj = requests.get(f"{s3_repo.url}/{object_path(head.root_hash)}", timeout=10)
    manifest = requests.get(f"{s3_repo.url}/manifest", timeout=10)

    assert obj.status_code == manifest.status_code == 200
    assert obj.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert manifest.headers["Cache-Control"] == "public, max-age=60"
    assert obj.headers["Content-Type"] == manifest.headers["Content-Type"]
    assert obj.headers["Content-Type"] == "application/octet-stream"


def test_without_a_public_read_policy_clients_are_refused(endpoint: str, tmp_path: Path) -> None:
    repo = S3Repo(endpoint, new_bucket(endpoint, public=False), tmp_path / "keys")
    run_cli("repo-server", "init", repo.location, "--name", NAME, *repo.options)

    err = client(repo, "ls", "/", check=False).decode()

    assert err.startswith("error: ") and "HTTP 403" in err


@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None,
    reason="needs /dev/fuse and fusermount (apt-get install fuse libfuse2)",
)
def test_a_mount_of_the_bucket_shows_the_release(s3_repo: S3Repo, tmp_path: Path) -> None:
    tree = write_build_tree(tmp_path / "src", seed=8, small_files=20, big_files=1, big_size=5 * MiB)
    publish(tmp_path / "src", s3_repo, "/sw")

    with mounted(s3_repo.url, tmp_path / "mnt", tmp_path / "cache", s3_repo.pub) as mnt:
        for relpath in ("lib000/mod3.py", "data/calib0.bin"):
            assert (mnt / "sw" / relpath).read_bytes() == tree[relpath]
        assert sorted(os.listdir(mnt / "sw")) == ["data", "lib000"]


# -- check ----------------------------------------------------------------------------


def test_check_is_green_and_finds_a_tampered_object(s3_repo: S3Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "reco.py").write_text("print('reconstruct')\n" * 50)
    (src / "geometry.xml").write_text("<detector/>\n")
    publish(src, s3_repo, "/sw")
    check = ("repo-server", "check", s3_repo.location, *s3_repo.options)
    assert run_cli(*check).stdout.decode().startswith("check ok")

    digest = open_reader(s3_repo).lookup("/sw/reco.py").hash
    assert digest is not None
    key = f"{PREFIX}/{object_path(digest)}"
    s3_repo.s3().put_object(Bucket=s3_repo.bucket, Key=key, Body=b"print('forged')\n")

    result = run_cli(*check, check=False)
    assert result.returncode == 1
    assert f"object {digest}" in result.stdout.decode()
    assert "check FAILED" in result.stdout.decode()
    err = client(s3_repo, "cat", "/sw/reco.py", check=False).decode()
    assert err.startswith("error: ")
    assert client(s3_repo, "cat", "/sw/geometry.xml") == b"<detector/>\n"

    # The repair path: the forged object goes to quarantine/, a publish stores it again.
    result = run_cli(*check, "--repair", check=False)
    quarantined = f"{PREFIX}/quarantine/{digest}"
    assert f"moved to s3://{s3_repo.bucket}/{quarantined}" in result.stdout.decode()
    kept = s3_repo.s3().get_object(Bucket=s3_repo.bucket, Key=quarantined)["Body"].read()
    assert kept == b"print('forged')\n"
    publish(src, s3_repo, "/sw")
    assert run_cli(*check).stdout.decode().startswith("check ok")
    assert client(s3_repo, "cat", "/sw/reco.py") == b"print('reconstruct')\n" * 50


def test_check_reports_a_deleted_object_as_missing(
    s3_repo: S3Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "VERSION").write_text("1.0\n")
    publish(src, s3_repo, "/sw")
    digest = open_reader(s3_repo).lookup("/sw/VERSION").hash
    assert digest is not None
    s3_repo.s3().delete_object(Bucket=s3_repo.bucket, Key=f"{PREFIX}/{object_path(digest)}")

    # The endpoint may also come from the environment, as boto3 reads it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_repo.endpoint)
    result = run_cli("repo-server", "check", s3_repo.location, "--keys", s3_repo.keys, check=False)

    assert result.returncode == 1
    assert f"object {digest}: missing" in result.stdout.decode()


def test_gc_deletes_from_the_bucket_what_no_kept_revision_reaches(
    s3_repo: S3Repo, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "VERSION").write_text("1.0\n")
    publish(src, s3_repo, "/sw")
    old = open_reader(s3_repo).lookup("/sw/VERSION").hash
    assert old is not None
    (src / "VERSION").write_text("2.0\n")
    publish(src, s3_repo, "/sw")
    backdate_history(LocalRepository.on_s3(s3_repo.storage(), s3_repo.keys), 7 * 86400)

    gc = ("repo-server", "gc", s3_repo.location, "--keep-revisions", "1", "--grace", "0")
    run_cli(*gc, *s3_repo.options)

    assert f"{PREFIX}/{object_path(old)}" not in s3_repo.keys_in_bucket()
    assert client(s3_repo, "cat", "/sw/VERSION") == b"2.0\n"
    run_cli("repo-server", "check", s3_repo.location, *s3_repo.options)


# -- the operator's mistakes ----------------------------------------------------------


def test_mistakes_get_one_line_saying_what_to_do(s3_repo: S3Repo, endpoint: str) -> None:
    def error(*args: str | Path) -> str:
        result = run_cli("repo-server", *args, check=False)
        assert result.returncode == 1, result
        stderr = result.stderr.decode()
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        return stderr

    assert "--keys KEYDIR" in error("info", s3_repo.location, "--endpoint-url", endpoint)
    assert "holds files already" in error(
        "init", s3_repo.location, "--name", NAME, "--keys", s3_repo.keys.parent / "k2",
        "--endpoint-url", endpoint,
    )  # fmt: skip
    missing_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/sw"
    assert "bucket does not exist" in error("info", missing_bucket, *s3_repo.options)
    assert "expected s3://BUCKET" in error("info", "s3://B_/x", *s3_repo.options)
    assert "not a local directory" in error("serve", s3_repo.location, *s3_repo.options)
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert "endpoint" in error("info", s3_repo.location, "--keys", s3_repo.keys,
                               "--endpoint-url", unreachable)  # fmt: skip


# -- the storage itself ---------------------------------------------------------------


@pytest.mark.parametrize("list_from", [1, 10**9], ids=["listing", "head-each"])
def test_missing_answers_the_same_by_listing_and_by_head(
    s3_repo: S3Repo, monkeypatch: pytest.MonkeyPatch, list_from: int
) -> None:
    storage = s3_repo.storage()
    # Spread over many data/xx/ directories, and many in one of them (data/ab/).
    contents = [f"{i}".encode() for i in range(256)]
    contents += [c for i in range(10000) if hashlib.sha256(c := b"ab%d" % i).hexdigest() < "ac"]
    by_digest = {hashlib.sha256(c).hexdigest(): c for c in contents}
    digests = list(by_digest)
    stored = set(digests[::3])
    for digest in stored:
        assert storage.put_object(digest, by_digest[digest])
    monkeypatch.setattr(s3_storage, "LIST_FROM", list_from)

    fresh = s3_repo.storage()  # knows nothing yet, as in a new process
    assert fresh.missing(digests) == set(digests) - stored
    first = digests[0]
    assert not fresh.put_object(first, by_digest[first])  # already there: not written again
    one = {d for d in digests if d.startswith("ab")}
    assert len(one) >= 40
    assert s3_repo.storage().missing(one) == one - stored
    listed = dict(fresh.iter_objects())
    assert stored <= set(listed) and all(listed[d] == len(by_digest[d]) for d in stored)


def test_both_storages_read_an_object_header_without_the_rest(s3_repo: S3Repo, repo: Repo) -> None:
    """What the publish gateway reads to learn a stored object's content size."""
    compressor = zstandard.ZstdCompressor(level=3)
    objects = {
        content: encode_object(content, compressor)
        for content in (b"", b"raw and short", bytes(1 << 20))
    }
    for storage in (s3_repo.storage(), LocalStorage(repo.dir)):
        for content, stored in objects.items():
            digest = content_hash(content)
            storage.put_object(digest, stored)
            head, size = storage.object_head(digest, HEADER_BYTES)
            assert (head, size) == (stored[:HEADER_BYTES], len(stored))
            assert declared_content_size(head, size) == len(content)
        with pytest.raises(FileNotFoundError):
            storage.object_head("0" * 64, HEADER_BYTES)
