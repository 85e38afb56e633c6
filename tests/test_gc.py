"""gc never takes away what a client may still read, and clears what crashes left.

The story: a release goes out and the operator reclaims space at once with
`gc --keep-revisions 1`. Mounts still inside the old revision's TTL keep reading it
(they switch at their next look at the manifest); gc says which revisions it kept for
them. Temporary files that killed writers left behind go too.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import (
    MiB,
    Repo,
    backdate_history,
    mounted,
    open_reader,
    publish,
    read_files,
    read_tree,
    run_cli,
    write_build_tree,
)

HOUR = 3600


def gc(repo: Repo, *options: str | int) -> list[str]:
    return run_cli("repo-server", "gc", repo.dir, *map(str, options)).stdout.decode().splitlines()


@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None,
    reason="needs /dev/fuse and fusermount (apt-get install fuse libfuse2)",
)
def test_gc_right_after_a_publish_leaves_mounts_on_the_old_revision_reading(
    repo: Repo, tmp_path: Path
) -> None:
    old = write_build_tree(tmp_path / "1.0", seed=1, small_files=300, big_files=1, big_size=MiB)
    publish(tmp_path / "1.0", repo, "/sw")
    with mounted(str(repo.dir), tmp_path / "mnt", tmp_path / "cache", repo.pub) as mnt:
        assert (mnt / "sw" / "lib001" / "mod100.py").read_bytes() == old["lib001/mod100.py"]
        new = write_build_tree(tmp_path / "2.0", seed=2, small_files=50, big_files=0)
        publish(tmp_path / "2.0", repo, "/sw", "--replace")  # replaces every file of release 1

        out = gc(repo, "--keep-revisions", 1, "--grace", 0)

        # The mount has not looked at the manifest again (its TTL is 240 s): it still
        # reads release 1, every catalog and object of which gc had to keep.
        assert read_files(mnt / "sw") == old
    assert out[0] == "gc: kept 3 revisions (0-2), dropped 0 (none)"
    assert (
        "gc: kept revisions 0-1 beyond --keep-revisions: replaced less than 300 s ago, "
        "so clients may still read them (the manifest's TTL of 240 s, 60 s more in "
        "proxies)" in out
    )
    assert read_tree(open_reader(repo), "/sw") == new


def test_gc_drops_revisions_replaced_longer_ago_than_clients_hold_a_manifest(
    repo: Repo, tmp_path: Path
) -> None:
    for version in (1, 2, 3):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / "VERSION").write_text(f"{version}\n")
        publish(tmp_path / "src", repo, "/sw")
    backdate_history(repo.open(), HOUR)  # released an hour ago and before

    out = gc(repo, "--keep-revisions", 1, "--grace", 0)

    assert out[0] == "gc: kept 1 revisions (3), dropped 3 (0-2)"
    assert not any("beyond --keep-revisions" in line for line in out)
    run_cli("repo-server", "check", repo.dir, "--all")


def test_gc_keeps_revisions_replaced_within_a_longer_grace_period(
    repo: Repo, tmp_path: Path
) -> None:
    for version in (1, 2):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / "VERSION").write_text(f"{version}\n")
        publish(tmp_path / "src", repo, "/sw")
    backdate_history(repo.open(), HOUR)

    out = gc(repo, "--keep-revisions", 1, "--grace", 2 * HOUR)

    assert out[0] == "gc: kept 3 revisions (0-2), dropped 0 (none)"
    assert (
        "gc: kept revisions 0-1 beyond --keep-revisions: replaced less than 7200 s ago, "
        "so clients may still read them (--grace)" in out
    )


def test_gc_removes_temporary_files_older_than_the_grace_period(repo: Repo) -> None:
    def left(relpath: str, age: float) -> Path:
        path = repo.dir / relpath
        path.write_bytes(b"half written")
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    # Written by a host whose processes gc cannot see: only age tells them apart.
    killed_object = left("data/3f/.tmp-4242@build-7.example.org-0123abcd", 2 * HOUR)
    killed_manifest = left(".tmp-4242@build-7.example.org-4567ef01", 2 * HOUR)
    uploading = left("data/40/.tmp-77@gateway.example.org-89abcdef", 60)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a process of this host that is gone: its files go at once
    dead_writer = left(f"data/41/.tmp-{dead}@{socket.gethostname()}-00ff00ff", 0)

    out = gc(repo, "--grace", 600)

    assert not killed_object.exists() and not killed_manifest.exists()
    assert not dead_writer.exists()
    assert uploading.exists()
    assert "gc: removed 3 temporary files (older than 600 s, or of writers gone)" in out
    run_cli("repo-server", "check", repo.dir)
