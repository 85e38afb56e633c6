"""`cvmfs-client mount` on libfuse3's low-level API: the kernel caches names, attributes, listings
and pages for a day, one inode per content; a revision switch drops exactly what
changed, while files opened or mapped before it keep their revision's bytes."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import BIN, Repo, client_daemon, run_cli
from tests.test_mount import Mount, make_release, republish_other
from tests.test_trust import head, release, signed_manifest

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="needs /dev/fuse and root (libfuse3 mounts without fusermount3)",
)


def stats(mnt: Path) -> dict[str, object]:
    return json.loads(os.getxattr(mnt, "user.stats"))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def inodes_settle_to(mnt: Path, expected: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (held := stats(mnt)["inodes"]) != expected:
        assert time.monotonic() < deadline, f"{held} inodes held, {expected} expected"
        drop_caches()
        time.sleep(0.2)


@pytest.fixture
def switching(repo: Repo, tmp_path: Path) -> Iterator[tuple[Mount, Repo, Path]]:
    src = make_release(tmp_path)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache", "--max-ttl", "1") as m:
        yield m, repo, src


@pytest.mark.parametrize(
    ("content", "keep_mtime"),
    [(b"UNTOUCHED\n", True), (b"a much longer second release\n", False), (b"short\n", False)],
)
def test_files_opened_and_mapped_before_a_switch_keep_their_bytes_after_it(
    switching: tuple[Mount, Repo, Path], content: bytes, keep_mtime: bool
) -> None:
    m, repo, src = switching
    other = m.path / "sw/1.0/bin/other.txt"
    fd = os.open(other, os.O_RDONLY)
    shared = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    private = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
    try:
        republish_other(m, repo, src, content, keep_mtime=keep_mtime)
        assert other.read_bytes() == content  # by name: the new revision, at once
        assert shared[:] == b"untouched\n"  # mapped before: the old one, never mixed
        assert private[:] == b"untouched\n"
        assert os.pread(fd, 4096, 0) == b"untouched\n"
        assert os.fstat(fd).st_size == len(b"untouched\n")
        new = os.open(other, os.O_RDONLY)
        try:
            remapped = mmap.mmap(new, 0, mmap.MAP_SHARED, mmap.PROT_READ)
            assert remapped[:] == content
            remapped.close()
        finally:
            os.close(new)
    finally:
        shared.close()
        private.close()
        os.close(fd)


def test_a_name_cached_as_missing_appears_as_soon_as_its_revision_is_served(
    switching: tuple[Mount, Repo, Path],
) -> None:
    m, repo, src = switching
    added = m.path / "sw/1.0/bin/added.txt"
    assert not added.exists()  # now a negative entry, cached for a day
    listing = sorted(os.listdir(m.path / "sw/1.0/bin"))  # the listing is cached too
    (src / "bin" / "added.txt").write_text("new in revision 2\n")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    deadline = time.monotonic() + 15
    while os.getxattr(m.path, "user.revision") != b"2":
        assert time.monotonic() < deadline, "the mount never switched to revision 2"
        time.sleep(0.2)
    # Announced only once the kernel dropped what changed: no waiting past this point.
    assert added.read_text() == "new in revision 2\n"
    assert sorted(os.listdir(m.path / "sw/1.0/bin")) == sorted([*listing, "added.txt"])
    assert (m.path / "sw/1.0/bin/tool.py").read_text().startswith("import pkg")


def test_the_inodes_of_an_old_revision_are_forgotten_once_nothing_uses_them(
    switching: tuple[Mount, Repo, Path],
) -> None:
    m, repo, src = switching
    inodes_settle_to(m.path, 1)  # the root only
    for path in (m.path / "sw").rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.read_bytes()
    held = open(m.path / "sw/1.0/bin/other.txt", "rb")  # noqa: SIM115 - held across the switch
    try:
        republish_other(m, repo, src, b"UNTOUCHED\n", keep_mtime=True)
        assert (m.path / "sw/1.0/bin/other.txt").read_bytes() == b"UNTOUCHED\n"
        drop_caches()
        # The open file pins its inode and the directories above it.
        assert held.read() == b"untouched\n"
        assert 1 < stats(m.path)["inodes"] <= 6  # type: ignore[operator]
    finally:
        held.close()
    inodes_settle_to(m.path, 1)
    requests = stats(m.path)["requests"]
    assert isinstance(requests, dict)
    # Many files were read, but only the first open reached the client: answered
    # ENOSYS, it told the kernel to send no more.
    assert requests["forget"] >= 1 and requests.get("open", 0) <= 1


def test_stat_shows_requests_by_kind(switching: tuple[Mount, Repo, Path]) -> None:
    m, _, _ = switching
    (m.path / "sw/1.0/bin/tool.py").read_bytes()
    out = run_cli("cvmfs-client", "stat", m.path).stdout.decode()
    lines = out.splitlines()
    kinds = [ln.split(":")[0].strip() for ln in lines[lines.index("requests:") + 1 :]]
    assert "lookup" in kinds and "read" in kinds


def test_names_the_kernel_cached_are_refused_once_the_manifest_expired(
    repo: Repo, tmp_path: Path
) -> None:
    release(tmp_path, repo, "1.0")
    soon = replace(head(repo), expires=int(time.time()) + 6)
    (repo.dir / "manifest").write_bytes(signed_manifest(repo, soon))
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache", "--max-ttl", "1") as m:
        run_sh = m.path / "sw/1.0/bin/run.sh"
        assert run_sh.read_text() == "echo 1.0\n"  # its name now cached for a day
        time.sleep(max(0.0, soon.expires - time.time()))
        deadline = time.monotonic() + 10
        while True:
            try:
                run_sh.read_text()
            except OSError as refused:
                assert refused.errno == errno.EIO
                break
            assert time.monotonic() < deadline, "a cached name was served past expiry"
            time.sleep(0.2)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_memory_stays_bounded_on_a_walk_of_a_large_tree(repo: Repo, tmp_path: Path) -> None:
    """200k entries walked with a stat of each: the daemon's memory grows by what the
    kernel holds (an inode each) and the bounded listing cache, and the inode table
    empties again when the kernel drops its caches."""
    src = tmp_path / "src"
    for d in range(200):
        directory = src / f"d{d:03}"
        directory.mkdir(parents=True)
        for f in range(999):
            (directory / f"f{f:03}.py").write_bytes(b"")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/big", timeout=1800)
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
        pid = client_daemon(m.path)
        assert pid is not None
        os.listdir(m.path / "big")
        before = rss_kib(pid)
        walked = 0
        for dirpath, dirnames, filenames in os.walk(m.path / "big"):
            for name in (*dirnames, *filenames):
                os.lstat(os.path.join(dirpath, name))
                walked += 1
        assert walked == 200 * 1000
        grown = rss_kib(pid) - before
        print(f"RSS {before} KiB before, +{grown} KiB after walking {walked} entries")
        assert grown < 400 * 1024  # about 2 KiB an entry, the kernel's inodes included
        inodes_settle_to(m.path, 1, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_foreground_mount_unmounts_and_exits_on_ctrl_c_or_term(
    repo: Repo, tmp_path: Path, sig: signal.Signals
) -> None:
    release(tmp_path, repo, "1.0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [str(BIN / "cvmfs-client"), "mount", str(repo.dir), str(mnt), "--key", str(repo.pub),
         "--cache-dir", str(tmp_path / "cache"), "--foreground"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "never mounted"
            time.sleep(0.1)
        assert (mnt / "sw/1.0/bin/run.sh").read_text() == "echo 1.0\n"
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
