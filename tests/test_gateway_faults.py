"""The publish API under faults: decompression bombs, a full disk, an expired whitelist
or manifest, surprises on the server, hostile paths and doubled commits. Each answer
says what to do, the publisher shows it, and no path stays blocked."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import zstandard

from cvmfs_format.objects import content_hash
from repo_server import keys
from repo_server.api_errors import ApiError
from repo_server.leases import Leases
from repo_server.repository import DAY, LocalRepository, write_whitelist
from repo_server.tokens import Token
from tests.conftest import (
    MiB,
    Repo,
    open_reader,
    read_tree,
    run_cli,
    serving_process,
    small_tmpfs,
    write_build_tree,
)
from tests.publish_api import Api, ObjectBag, make_token

FILE, DIR = 0o100644, 0o040755


@pytest.fixture
def served(repo: Repo, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with serving_process(repo.dir, tmp_path / "serve.log") as server:
        yield server


def publish_http(
    src: Path, url: str, prefix: str, token: str, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    return run_cli(
        "cvmbuild", "publish", src, "--repo", url, "--path", prefix, *extra,
        env={"CVMBUILD_TOKEN": token}, check=False,
    )  # fmt: skip


def failed_with(result: subprocess.CompletedProcess[bytes], *says: str) -> str:
    """The one error line of a publish that failed at once (no retries), saying `says`."""
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "retrying" not in err and "lease unknown" not in err, err
    assert err.startswith("error: ") or "\nerror: " in err, err
    for text in says:
        assert text in err, err
    return err


def tiny_tree(root: Path, content: bytes = b"payload") -> Path:
    root.mkdir(parents=True)
    (root / "f").write_bytes(content)
    return root


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def zstd_bomb(random_bytes: int, zeros: int) -> tuple[str, bytes]:
    """An object of a few MiB stored, zeros more content: (name, stored bytes)."""
    prefix, block = os.urandom(random_bytes), bytes(MiB)
    hasher, out = hashlib.sha256(prefix), io.BytesIO()
    writer = zstandard.ZstdCompressor(level=1).stream_writer(
        out, size=random_bytes + zeros, closefd=False
    )
    writer.write(prefix)
    for _ in range(zeros // MiB):
        writer.write(block)
        hasher.update(block)
    writer.close()
    return hasher.hexdigest(), out.getvalue()


# -- fault 7: a small compressed upload must not cost the gateway a lot of memory --------


def test_a_small_zstd_bomb_costs_the_gateway_little_memory(
    repo: Repo, served: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, server = served
    api = Api(url, make_token(repo, "ci", "/sw"))
    lease = api.lease("/sw/bomb")
    small = ObjectBag()
    small.content(b"warm-up: every code path of an upload runs once")
    assert api.upload(lease, small.objects.items()).status_code == 200
    before = peak_rss(server.pid)

    # Just inside the bound (content at most 256 times the stored size): a valid object.
    inside = zstd_bomb(4 * MiB - 64 * 1024, 1000 * MiB)
    answer = api.upload(lease, [inside])
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == 1
    # Past it: refused, whether or not the frame declares its size.
    past = zstd_bomb(4 * MiB - 64 * 1024, 1100 * MiB)
    answer = api.upload(lease, [past])
    assert answer.status_code == 422 and "expected" in answer.json()["error"], answer.text

    grown = peak_rss(server.pid) - before
    assert grown < 150 * MiB, f"the gateway's peak memory grew by {grown / MiB:.0f} MiB"
    assert repo.open().storage.has(inside[0]) and not repo.open().storage.has(past[0])


# -- fault 12: every error a status and a message that says what to do --------------------


def test_a_path_that_is_not_strict_utf8_is_refused_before_any_lease(
    repo: Repo, served: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, _ = served
    api = Api(url, make_token(repo, "ci", "/sw"))
    for path in ("/sw/\ud800", "/sw/a\udc80b"):  # lone surrogates: no UTF-8 spells them
        answer = api.open_lease(path)
        assert answer.status_code == 400, answer.text
        assert "not valid UTF-8" in answer.json()["error"]
    api.drop(api.lease("/sw"))  # nothing was leased: the whole prefix is free


def expire_whitelist(repo: Repo) -> None:
    local = repo.open()
    files = local.key_files()
    master, signing = keys.load_private_key(files.master), keys.load_private_key(files.signing)
    # As the operator last renewed it 40 days ago, for 30 days.
    write_whitelist(
        local.storage, files.name, master, [signing.public_key()], int(time.time()) - 40 * DAY
    )


def expire_manifest(repo: Repo) -> None:
    local = repo.open()
    head = local.head()
    local._sign_manifest(
        head, head.revision, head.root_hash, head.root_size, head.history_hash,
        head.history_size, time.time() - 40 * DAY,
    )  # fmt: skip


@pytest.mark.parametrize(
    "expire, remedy, command",
    [
        (expire_whitelist, ["whitelist", "renew"], "repo-server whitelist renew"),
        (expire_manifest, ["resign"], "repo-server resign"),
    ],
)
def test_an_expired_head_stops_publishing_with_the_operators_command(
    tmp_path: Path,
    repo: Repo,
    served: tuple[str, subprocess.Popen[bytes]],
    expire: object,
    remedy: list[str],
    command: str,
) -> None:
    url, _ = served
    token = make_token(repo, "ci", "/sw")
    api = Api(url, token)
    src = tiny_tree(tmp_path / "src")
    # Expiring between the lease and the commit: the commit is refused, the lease ends.
    lease = api.lease("/sw/1")
    bag = ObjectBag()
    top = bag.catalog("/sw/1", [("/sw/1", "f", FILE, 3, 0, bag.content(b"abc"), None, 0, 0)])
    assert api.upload(lease, bag.objects.items()).status_code == 200
    expire(repo)  # type: ignore[operator]
    answer = api.commit(lease, top.hash)
    assert answer.status_code == 503 and command in answer.json()["error"], answer.text

    # From then on, refused before anything is uploaded, with the operator's command.
    answer = api.open_lease("/sw/1")
    assert answer.status_code == 503 and command in answer.json()["error"], answer.text
    failed_with(publish_http(src, url, "/sw/1", token), "signed head does not verify", command)
    assert repo.open().head_unverified().revision == 0

    run_cli("repo-server", *remedy, repo.dir)
    result = publish_http(src, url, "/sw/1", token)
    assert result.returncode == 0 and b"waiting" not in result.stderr, result.stderr
    assert read_tree(open_reader(repo), "/sw/1") == {"f": b"payload"}


def test_an_unexpected_server_error_is_a_500_that_points_to_the_log(
    tmp_path: Path, repo: Repo
) -> None:
    content = b"a file whose object directory is broken"
    broken = repo.dir / "data" / content_hash(content)[:2]
    shutil.rmtree(broken)
    broken.write_bytes(b"an operator's mistake: a file where a directory belongs")
    log = tmp_path / "serve.log"
    with serving_process(repo.dir, log) as (url, _):
        result = publish_http(
            tiny_tree(tmp_path / "src", content), url, "/sw", make_token(repo, "ci", "/")
        )
    err = failed_with(
        result, "the server failed: unexpected error on the server", "`repo-server serve`"
    )
    reference = err.split("details under ")[1].split()[0]
    logged = log.read_text()
    assert reference in logged and "Traceback" in logged and "NotADirectoryError" in logged
    assert repo.open().head().revision == 0


def test_a_commit_that_fails_leaves_the_path_free_for_the_next_publish(
    tmp_path: Path, repo: Repo, served: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, _ = served  # leases last the default 120 s: a blocked path would show
    token = make_token(repo, "ci", "/sw")
    assert publish_http(tiny_tree(tmp_path / "a"), url, "/sw", token).returncode == 0
    below_a_file = tiny_tree(tmp_path / "b", b"under /sw/f, which is a file")

    failed = publish_http(below_a_file, url, "/sw/f/x", token)
    failed_with(failed, "cannot publish below /sw/f: it exists and is not a directory")

    again = publish_http(tiny_tree(tmp_path / "c", b"replaces /sw"), url, "/sw", token)
    assert again.returncode == 0 and b"waiting" not in again.stderr, again.stderr
    assert repo.open().head().revision == 2


# -- fault 13: one lease, one commit ------------------------------------------------------


def waiting_for_flock(pid: int, lock_file: Path) -> bool:
    """Whether process pid waits for an flock on lock_file (/proc/locks, "->" lines)."""
    inode = os.stat(lock_file).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields:
            at = fields.index("FLOCK")
            if int(fields[at + 3]) == pid and fields[at + 4].endswith(f":{inode}"):
                return True
    return False


def test_two_simultaneous_commits_on_one_lease_make_one_revision(
    repo: Repo, served: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, server = served
    token = make_token(repo, "ci", "/sw")
    api = Api(url, token)
    lease = api.lease("/sw/1")
    bag = ObjectBag()
    top = bag.catalog("/sw/1", [("/sw/1", "f", FILE, 3, 0, bag.content(b"abc"), None, 0, 0)])
    assert api.upload(lease, bag.objects.items()).status_code == 200
    answers: list[requests.Response] = []

    def commit() -> None:
        answers.append(Api(url, token).commit(lease, top.hash))

    lock = repo.dir / ".lock"
    # A local publisher holds the repository's lock, so both commits are in flight at once.
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        first = threading.Thread(target=commit)
        first.start()
        deadline = time.monotonic() + 30
        while not waiting_for_flock(server.pid, lock):
            assert time.monotonic() < deadline, "the first commit never reached the lock"
            time.sleep(0.05)
        second = threading.Thread(target=commit)
        second.start()
        second.join(timeout=2)  # it must wait for the first (or be refused), never run
        fcntl.flock(held, fcntl.LOCK_UN)
    first.join(timeout=60)
    second.join(timeout=60)

    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert {a.json()["revision"] for a in answers} == {1}
    retried = api.commit(lease, top.hash)  # as after an answer lost on the way
    assert retried.status_code == 200 and retried.json()["revision"] == 1
    assert repo.open().head().revision == 1


# -- fault 15 over HTTP: a disk that fills ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted for the test (needs root)."""
    with small_tmpfs(tmp_path / "disk", "32m") as disk:
        yield disk


def fill(disk: Path) -> Path:
    """Fill the file system of disk to the last byte with one file; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    block = bytes(64 * 1024)
    try:
        for size in (len(block), 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block[:size])
    finally:
        os.close(fd)
    return filler


def disk_repo(small_disk: Path) -> Repo:
    repo = Repo(small_disk / "repo", small_disk / "repo.keys", "test.example.org")
    LocalRepository.init(repo.dir, repo.name)
    return repo


def leftovers(repo: Repo) -> list[str]:
    return [p.name for p in repo.dir.rglob(".tmp-*")]


def test_a_disk_that_fills_during_an_http_upload_gives_a_clear_error(
    tmp_path: Path, small_disk: Path
) -> None:
    repo = disk_repo(small_disk)
    first = write_build_tree(tmp_path / "v1", seed=1, small_files=30, big_files=0)
    token = make_token(repo, "ci", "/sw")
    with serving_process(repo.dir, tmp_path / "serve.log") as (url, _):
        assert publish_http(tmp_path / "v1", url, "/sw/1", token).returncode == 0
        big = tmp_path / "v2"
        big.mkdir()
        (big / "blob").write_bytes(os.urandom(8 * MiB))
        filler = fill(small_disk)
        os.truncate(filler, os.path.getsize(filler) - 4 * MiB)  # room for half of it

        failed_with(publish_http(big, url, "/sw/2", token), "the server's disk is full")
        assert repo.open().head().revision == 1
        assert read_tree(open_reader(repo), "/sw/1") == first
        run_cli("repo-server", "check", repo.dir)
        assert leftovers(repo) == []

        filler.unlink()  # the operator frees space: publishing works again at once
        again = publish_http(big, url, "/sw/2", token)
        assert again.returncode == 0 and b"waiting" not in again.stderr, again.stderr
    assert repo.open().head().revision == 2


def test_a_disk_that_fills_during_a_commit_keeps_the_last_revision(
    tmp_path: Path, small_disk: Path
) -> None:
    repo = disk_repo(small_disk)
    bag = ObjectBag()
    top = bag.catalog("/sw/1", [("/sw/1", "f", FILE, 3, 0, bag.content(b"abc"), None, 0, 0)])
    with serving_process(repo.dir, tmp_path / "serve.log") as (url, _):
        api = Api(url, make_token(repo, "ci", "/sw"))
        lease = api.lease("/sw/1")
        assert api.upload(lease, bag.objects.items()).status_code == 200
        filler = fill(small_disk)  # the new root catalog, history and manifest do not fit

        answer = api.commit(lease, top.hash)
        assert answer.status_code == 507, answer.text
        assert "no space left on the repository's disk" in answer.json()["error"]
        assert repo.open().head().revision == 0
        run_cli("repo-server", "check", repo.dir)
        assert leftovers(repo) == []

        filler.unlink()
        answer = api.commit(api.lease("/sw/1"), top.hash)  # the failed commit ended its lease
        assert answer.status_code == 200, answer.text
    assert read_tree(open_reader(repo), "/sw/1") == {"f": b"abc"}


def test_a_lease_asked_again_after_a_lost_answer_is_the_same_lease() -> None:
    leases = Leases(ttl=120, clock=lambda: 0.0)
    ci = Token("ci", "/sw", "x", 0)
    first = leases.acquire(ci, "/sw/1", publisher="p1")
    assert leases.acquire(ci, "/sw/1", publisher="p1") is first  # not "waiting" for itself
    with pytest.raises(ApiError, match="being published by 'ci'"):
        leases.acquire(ci, "/sw/1", publisher="p2")  # another publisher does wait
    with pytest.raises(ApiError, match="being published"):
        leases.acquire(ci, "/sw/1")
