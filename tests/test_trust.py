"""One trust core (cvmfs_format.trust.TrustedState) for every reader, and the faults an
outside attack run found in the rules it now holds: a mirror serving another repository
signed by the same master key, a mount serving an expired manifest forever, `cat` and
`ls` forgetting the revisions they saw, a fork under one revision number, and a
replicate that a trickling source held for ever."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cvmfs_format import manifest as manifest_mod
from cvmfs_format.errors import FormatError, VerificationError
from cvmfs_format.manifest import Manifest
from cvmfs_format.signed import attach_signature
from cvmfs_format.trust import Floor, TrustedState, pinned_name
from repo_server.keys import KeyFiles, load_private_key
from repo_server.repository import LocalRepository
from tests.conftest import (
    Repo,
    mounted,
    publish,
    run_cli,
    serving,
    trust_for,
)

HAS_FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None


def release(tmp_path: Path, repo: Repo, version: str) -> None:
    src = tmp_path / f"release-{version}"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "run.sh").write_text(f"echo {version}\n")
    publish(src, repo, f"/sw/{version}")


def signed_manifest(repo: Repo, manifest: Manifest) -> bytes:
    key = load_private_key(KeyFiles(repo.keys, repo.name).signing)
    body = manifest.body()
    return attach_signature(body, key.sign(body))


def head(repo: Repo) -> Manifest:
    return manifest_mod.parse((repo.dir / "manifest").read_bytes())[0]


# -- the rules, without I/O -------------------------------------------------------------


def test_the_trust_state_accepts_the_same_revision_resigned_and_refuses_a_fork(
    repo: Repo, tmp_path: Path
) -> None:
    release(tmp_path, repo, "1.0")
    whitelist = (repo.dir / "whitelist").read_bytes()
    genuine = (repo.dir / "manifest").read_bytes()
    current = head(repo)
    now = time.time()

    trust = trust_for(repo)
    trust.update_whitelist(whitelist, now)
    assert trust.update_manifest(genuine, now) == current
    assert trust.floor == Floor(current.revision, current.root_hash)

    # Re-signed (a fresh expiry, a tag added): same revision, same root: accepted.
    resigned = replace(current, published=current.published + 1, expires=current.expires + 60)
    assert trust.update_manifest(signed_manifest(repo, resigned), now) == resigned

    # Another root under the same revision number: a fork, or a stolen key at work.
    forked = replace(current, root_hash="ab" * 32)
    with pytest.raises(VerificationError, match="another root catalog"):
        trust.update_manifest(signed_manifest(repo, forked), now)
    with pytest.raises(VerificationError, match="refusing to go back"):
        older = replace(current, revision=current.revision - 1)
        trust.update_manifest(signed_manifest(repo, older), now)
    assert trust.manifest == resigned  # nothing refused was taken in


def test_the_trust_state_pins_the_repository_name(repo: Repo) -> None:
    trust = TrustedState(trust_for(repo).master_key, "other.example.org")
    with pytest.raises(VerificationError, match="serves repository 'test.example.org'"):
        trust.update_whitelist((repo.dir / "whitelist").read_bytes(), time.time())
    with pytest.raises(VerificationError, match="after its whitelist"):
        trust.update_manifest((repo.dir / "manifest").read_bytes(), time.time())


def test_the_name_comes_from_the_option_or_the_key_file_name() -> None:
    assert pinned_name("/etc/keys/sw.example.org.pub", None) == "sw.example.org"
    assert pinned_name("/etc/keys/sw.example.org.pub", "atlas.example.org") == "atlas.example.org"
    with pytest.raises(FormatError, match="--name"):
        pinned_name("/etc/keys/master.pem", None)
    with pytest.raises(FormatError, match="not a remembered revision"):
        Floor.decode("two", "state/floor")
    assert Floor.decode(Floor(7, "ab" * 32).encode(), "f") == Floor(7, "ab" * 32)
    assert Floor.decode("7\n", "an older client's file") == Floor(7)


# -- fault 4: another repository under the same master key ----------------------------


@pytest.fixture
def sibling(tmp_path: Path, repo: Repo) -> Repo:
    """A second repository whose whitelist the first one's master key signs: one
    organisation, one offline master key, several repositories."""
    other = Repo(tmp_path / "other", tmp_path / "other.keys", "other.example.org")
    LocalRepository.init(other.dir, other.name, other.keys)
    mine, theirs = KeyFiles(repo.keys, repo.name), KeyFiles(other.keys, other.name)
    shutil.copy(mine.master, theirs.master)
    shutil.copy(mine.public, theirs.public)
    run_cli("repo-server", "whitelist", "renew", other.dir, "--keys", other.keys)
    src = tmp_path / "other-release"
    src.mkdir()
    (src / "run.sh").write_text("echo not what you asked for\n")
    publish(src, other, "/sw/1.0")
    return other


def test_a_mirror_serving_another_repository_of_the_same_master_key_is_refused(
    tmp_path: Path, repo: Repo, sibling: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    # The sibling verifies under the same master key: only the name tells them apart.
    assert run_cli("cvmfs-client", "ls", sibling.dir, "/sw/1.0", "--key", sibling.pub).stdout
    result = run_cli("cvmfs-client", "ls", sibling.dir, "/sw/1.0", "--key", repo.pub, check=False)
    assert result.returncode == 1
    assert b"serves repository 'other.example.org', not 'test.example.org'" in result.stderr
    assert b"check the URL" in result.stderr

    mirror = tmp_path / "mirror"
    with serving(sibling.dir, tmp_path / "sibling.log") as url:
        result = run_cli("repo-server", "replicate", url, mirror, "--key", repo.pub, check=False)
    assert result.returncode == 1
    assert b"serves repository 'other.example.org'" in result.stderr
    assert not (mirror / "manifest").exists()


@pytest.mark.skipif(not HAS_FUSE, reason="needs /dev/fuse and fusermount")
def test_a_mount_refuses_another_repository_of_the_same_master_key(
    tmp_path: Path, repo: Repo, sibling: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli(
        "cvmfs-client", "mount", sibling.dir, mountpoint, "--key", repo.pub,
        "--cache-dir", tmp_path / "cache", check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert b"serves repository 'other.example.org'" in result.stderr
    assert not os.path.ismount(mountpoint)


def test_the_name_can_be_given_when_the_key_file_is_named_otherwise(
    tmp_path: Path, repo: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    key = tmp_path / "master.pem"
    shutil.copy(repo.pub, key)
    refused = run_cli("cvmfs-client", "ls", repo.dir, "/sw", "--key", key, check=False)
    assert refused.returncode == 1 and b"give the repository's name with --name" in refused.stderr
    listed = run_cli("cvmfs-client", "ls", repo.dir, "/sw", "--key", key, "--name", repo.name)
    assert listed.stdout == b"1.0\n"


# -- fault 8, part 1: cat and ls remember what they saw --------------------------------


def test_cat_and_ls_refuse_an_older_manifest_after_seeing_a_newer_one(
    tmp_path: Path, repo: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    old = (repo.dir / "manifest").read_bytes()
    release(tmp_path, repo, "2.0")
    assert run_cli("cvmfs-client", "ls", repo.dir, "/sw", "--key", repo.pub).stdout == b"1.0\n2.0\n"

    (repo.dir / "manifest").write_bytes(old)  # a stale mirror, or a replay
    for command, path in (("ls", "/sw"), ("cat", "/sw/1.0/bin/run.sh")):
        result = run_cli("cvmfs-client", command, repo.dir, path, "--key", repo.pub, check=False)
        assert result.returncode == 1, command
        assert b"revision 1 is older than revision 2 already seen" in result.stderr, command


def test_a_fork_under_an_already_seen_revision_number_is_refused_by_cat(
    tmp_path: Path, repo: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    run_cli("cvmfs-client", "cat", repo.dir, "/sw/1.0/bin/run.sh", "--key", repo.pub)
    genuine = head(repo)
    other_root = LocalRepository(repo.dir, repo.keys).history(genuine).revision(0)
    forked = replace(genuine, root_hash=other_root.root_hash, root_size=other_root.root_size)
    (repo.dir / "manifest").write_bytes(signed_manifest(repo, forked))
    result = run_cli("cvmfs-client", "ls", repo.dir, "/", "--key", repo.pub, check=False)
    assert result.returncode == 1
    assert b"another root catalog" in result.stderr


# -- fault 8, part 2: a running mount does not serve an expired manifest ---------------


@pytest.mark.skipif(not HAS_FUSE, reason="needs /dev/fuse and fusermount")
def test_a_running_mount_stops_serving_an_expired_manifest_until_it_is_renewed(
    tmp_path: Path, repo: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    release(tmp_path, repo, "2.0")
    lifetime = 6
    soon = replace(head(repo), expires=int(time.time()) + lifetime)
    (repo.dir / "manifest").write_bytes(signed_manifest(repo, soon))
    with mounted(
        str(repo.dir), tmp_path / "mnt", tmp_path / "cache", repo.pub, "--max-ttl", "1"
    ) as mnt:
        assert (mnt / "sw/1.0/bin/run.sh").read_text() == "echo 1.0\n"
        time.sleep(max(0.0, soon.expires - time.time()) + 1.5)
        with pytest.raises(OSError) as refused:
            os.listdir(mnt / "sw/2.0/bin")
        assert refused.value.errno == errno.EIO
        log = (tmp_path / "cache" / "client.log").read_text()
        assert "expired" in log

        run_cli("repo-server", "resign", repo.dir)  # the operator renews it
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if os.listdir(mnt / "sw/2.0/bin") == ["run.sh"]:
                    break
            assert time.monotonic() < deadline, "the mount never took the renewed manifest"
            time.sleep(0.5)


# -- fault 10: replicate has a deadline -------------------------------------------------


@contextlib.contextmanager
def trickling_server(bytes_per_second: float) -> Iterator[str]:
    """An HTTP server that answers every GET with 200 and a body sent a byte at a time:
    a source that is alive, and never done."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            with contextlib.suppress(OSError):
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while not stop.wait(1 / bytes_per_second):
                    conn.sendall(b"x")

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def test_replicate_gives_up_on_a_trickling_source_within_its_timeout(
    tmp_path: Path, repo: Repo
) -> None:
    mirror = tmp_path / "mirror"
    with trickling_server(bytes_per_second=2) as url:
        start = time.monotonic()
        result = run_cli(
            "repo-server", "replicate", url, mirror, "--key", repo.pub, "--timeout", "4",
            check=False, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - start
    assert result.returncode == 1
    assert b"not done within --timeout 4 s" in result.stderr
    assert b"unchanged (no revision yet)" in result.stderr
    assert took < 15, f"replicate held on for {took:.1f} s"
    # The mirror lock went with it: the next run (against the real source) goes ahead.
    with serving(repo.dir, tmp_path / "source.log") as source:
        run_cli("repo-server", "replicate", source, mirror, "--key", repo.pub)
    assert (mirror / "manifest").read_bytes() == (repo.dir / "manifest").read_bytes()


def test_a_damaged_remembered_revision_is_one_line_saying_what_to_do(
    tmp_path: Path, repo: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    run_cli("cvmfs-client", "ls", repo.dir, "/sw", "--key", repo.pub)
    (floor,) = (tmp_path / "client-state").glob("floor-*")
    floor.write_text("garbage\n")
    result = run_cli("cvmfs-client", "ls", repo.dir, "/sw", "--key", repo.pub, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"error: {floor}: not a remembered revision")
    assert b"remove it to trust the server again" in result.stderr


def test_replicate_refuses_to_turn_a_mirror_of_one_repository_into_another(
    tmp_path: Path, repo: Repo, sibling: Repo
) -> None:
    release(tmp_path, repo, "1.0")
    mirror = tmp_path / "mirror"
    with serving(repo.dir, tmp_path / "source.log") as url:
        bad = run_cli("repo-server", "replicate", url, mirror, "--key", repo.pub,
                      "--timeout", "0", check=False)  # fmt: skip
        assert bad.returncode == 1 and b"--timeout must be more than 0" in bad.stderr
        run_cli("repo-server", "replicate", url, mirror, "--key", repo.pub)
    before = (mirror / "manifest").read_bytes()
    with serving(sibling.dir, tmp_path / "sibling.log") as url:
        result = run_cli("repo-server", "replicate", url, mirror, "--key", sibling.pub, check=False)
    assert result.returncode == 1
    assert b"holds repository 'test.example.org', not 'other.example.org'" in result.stderr
    assert (mirror / "manifest").read_bytes() == before
