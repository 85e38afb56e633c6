"""The FUSE mount as a user meets it: files identical to the build tree, programs run,
tampering costs one file (EIO), never wrong bytes, and old manifests are refused."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_client.fetcher import DirectoryFetcher
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.objects import object_path
from tests.conftest import Repo, mounted, run_cli, serving, trust_for

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None,
    reason="needs /dev/fuse and fusermount (apt-get install fuse libfuse2)",
)


def make_release(root: Path) -> Path:
    src = root / "release"
    (src / "bin").mkdir(parents=True)
    (src / "lib" / "pkg").mkdir(parents=True)
    (src / "lib" / "pkg" / "__init__.py").write_text("ANSWER = 42\n")
    (src / "lib" / "pkg" / "data.bin").write_bytes(os.urandom(9 * 1024 * 1024))
    tool = src / "bin" / "tool.py"
    tool.write_text("import pkg\nprint('answer', pkg.ANSWER)\n")
    tool.chmod(0o755)
    (src / "bin" / "other.txt").write_text("untouched\n")
    os.symlink("../lib/pkg", src / "bin" / "pkg-link")
    os.utime(src / "bin" / "other.txt", ns=(1_600_000_000_123_456_789,) * 2)
    return src


class Mount:
    """`cvmfs-client mount` for the duration of a with-block (conftest.mounted)."""

    def __init__(
        self, repo: Repo, mountpoint: Path, cache: Path, *extra: str, url: str | None = None
    ):
        self._context = mounted(url or str(repo.dir), mountpoint, cache, repo.pub, *extra)
        self.path = mountpoint

    def __enter__(self) -> Mount:
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(None, None, None)


def mount_fails(url: str, mountpoint: Path, repo: Repo, cache: Path) -> str:
    """Run a mount that must fail: exit 1, nothing mounted; returns its stderr."""
    mountpoint.mkdir(exist_ok=True)
    result = run_cli(
        "cvmfs-client", "mount", url, mountpoint, "--key", repo.pub, "--cache-dir", cache,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert not os.path.ismount(mountpoint)
    return result.stderr.decode()


@pytest.fixture
def published(repo: Repo, tmp_path: Path) -> Iterator[tuple[Repo, Path]]:
    src = make_release(tmp_path)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    yield repo, src


@pytest.mark.parametrize("workers", ["4", "0"])
def test_mounted_release_is_identical_to_the_build_tree(
    published: tuple[Repo, Path], tmp_path: Path, workers: str
) -> None:
    """Fetched by the mount's worker processes (the default) or by the mount itself."""
    repo, src = published
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache", "--fetch-workers", workers) as m:
        base = m.path / "sw" / "1.0"
        for path in src.rglob("*"):
            mounted = base / path.relative_to(src)
            st_src, st_mnt = path.lstat(), mounted.lstat()
            assert st_mnt.st_mode == st_src.st_mode, path
            assert st_mnt.st_mtime_ns == st_src.st_mtime_ns, path
            if path.is_symlink():
                assert os.readlink(mounted) == os.readlink(path)
            elif path.is_file():
                assert mounted.read_bytes() == path.read_bytes(), path
        assert os.getxattr(m.path, "user.revision") == b"1"
        daemon = json.loads(os.getxattr(m.path, "user.stats"))["pid"]
        children = Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split()
        assert len(children) == int(workers)


def test_listing_the_mount_shows_the_names_types_and_attributes_of_the_build_tree(
    repo: Repo, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "one.txt").write_text("one\n")
    (src / "a" / "b" / "big.bin").write_bytes(os.urandom(3 << 20))
    os.link(src / "a" / "one.txt", src / "a" / "b" / "same.txt")
    os.symlink("b/big.bin", src / "a" / "link")
    (src / "a" / "run.sh").write_text("#!/bin/sh\n")
    (src / "a" / "run.sh").chmod(0o755)
    os.utime(src / "a" / "b", ns=(1_500_000_000_987_654_321,) * 2)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw")
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
        base = m.path / "sw"

        def walk(directory: Path) -> None:
            # Names and types as readdir gives them, then each entry's attributes.
            with os.scandir(directory) as listing:
                seen = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in listing}
            origin = src / directory.relative_to(base)
            assert seen == {
                p.name: (p.is_dir() and not p.is_symlink(), p.is_symlink())
                for p in origin.iterdir()
            }
            for name, (is_dir, _) in seen.items():
                st_src, st_mnt = (origin / name).lstat(), (directory / name).lstat()
                assert st_mnt.st_mode == st_src.st_mode, name
                assert st_mnt.st_mtime_ns == st_src.st_mtime_ns, name
                if not is_dir:
                    assert (st_mnt.st_size, st_mnt.st_nlink) == (st_src.st_size, st_src.st_nlink)
                else:
                    walk(directory / name)

        walk(base)


def test_a_name_that_is_not_utf8_is_simply_not_found(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, _ = published
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
        with pytest.raises(FileNotFoundError):
            os.stat(bytes(m.path) + b"/sw/1.0/\xff")
        with pytest.raises(FileNotFoundError):
            open(bytes(m.path) + b"/sw/1.0/bin/\xfe.txt", "rb")


def test_a_python_program_runs_from_the_mount(published: tuple[Repo, Path], tmp_path: Path) -> None:
    repo, _ = published
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
        base = m.path / "sw" / "1.0"
        out = subprocess.run(
            [sys.executable, str(base / "bin" / "tool.py")],
            env={**os.environ, "PYTHONPATH": str(base / "lib")},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == "answer 42\n"


def test_a_tampered_object_is_an_io_error_for_that_file_only(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    reader = RepositoryReader(DirectoryFetcher(str(repo.dir)), trust_for(repo))
    digest = reader.lookup("/sw/1.0/lib/pkg/__init__.py").hash
    assert digest is not None
    obj = repo.dir / object_path(digest)
    obj.write_bytes(b"ANSWER = 666\n")
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
        base = m.path / "sw" / "1.0"
        with pytest.raises(OSError) as failure:
            (base / "lib" / "pkg" / "__init__.py").read_bytes()
        assert failure.value.errno == 5  # EIO
        assert (base / "bin" / "other.txt").read_text() == "untouched\n"


def test_an_older_manifest_is_refused_after_a_newer_one(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    old_manifest = (repo.dir / "manifest").read_bytes()
    (src / "bin" / "other.txt").write_text("second release\n")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
        assert (m.path / "sw/1.0/bin/other.txt").read_text() == "second release\n"
    (repo.dir / "manifest").write_bytes(old_manifest)  # a replayed, validly signed manifest
    stderr = mount_fails(str(repo.dir), tmp_path / "mnt2", repo, tmp_path / "cache")
    assert "older than revision 2" in stderr


def test_mount_without_a_reachable_repository_fails_clearly(repo: Repo, tmp_path: Path) -> None:
    stderr = mount_fails("http://127.0.0.1:9", tmp_path / "mnt", repo, tmp_path / "cache")
    assert stderr.startswith("error: ") and stderr.count("\n") == 1


def test_the_cache_stays_under_its_quota_while_files_stay_readable(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    data = src / "lib" / "pkg" / "data.bin"  # 9 MiB, chunked into about 1 MiB pieces
    cache = tmp_path / "cache"
    with Mount(repo, tmp_path / "mnt", cache, "--quota", "3M") as m:
        mounted = m.path / "sw/1.0/lib/pkg/data.bin"
        expected = data.read_bytes()
        rng = random.Random(7)
        with open(mounted, "rb") as f:
            for _ in range(40):
                offset = rng.randrange(len(expected))
                f.seek(offset)
                assert f.read(65536) == expected[offset : offset + 65536]
                stored = sum(
                    p.stat().st_size for p in (cache / "objects").rglob("*") if p.is_file()
                )
                assert stored <= 3 * 1024 * 1024 + 1024 * 1024  # quota, plus catalogs pinned
        assert mounted.read_bytes() == expected


def test_a_preloaded_cache_mounts_and_reads_with_the_server_gone(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    cache = tmp_path / "cache"
    with serving(repo.dir, tmp_path / "serve.log") as url:
        out = run_cli("cvmfs-client", "preload", url, cache, "--key", repo.pub, "--path", "/sw")
        assert b"preloaded /sw of revision 1" in out.stdout
    # The server is gone: the mount comes up from the saved manifest and the warm cache.
    with Mount(repo, tmp_path / "mnt", cache, url=url) as m:
        base = m.path / "sw" / "1.0"
        for path in src.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert (base / path.relative_to(src)).read_bytes() == path.read_bytes()
        stat = run_cli("cvmfs-client", "stat", m.path).stdout.decode()
        assert "revision:          1" in stat and "offline:           True" in stat
        assert "io_errors:         0" in stat


def test_cache_verify_removes_a_corrupted_entry_and_the_mount_fetches_it_again(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    cache = tmp_path / "cache"
    run_cli("cvmfs-client", "preload", repo.dir, cache, "--key", repo.pub)
    tool = (src / "bin" / "tool.py").read_bytes()
    digest = hashlib.sha256(tool).hexdigest()
    entry = cache / "objects" / digest[:2] / digest[2:]
    entry.write_bytes(b"print('not what was published')\n")
    verify = run_cli("cvmfs-client", "cache", "verify", "--cache-dir", cache, check=False)
    assert verify.returncode == 3  # corruption found (and removed)
    assert f"removed corrupt entry {digest}" in verify.stdout.decode()
    assert not entry.exists()
    entry.parent.mkdir(exist_ok=True)
    entry.write_bytes(b"corrupted again, behind the verifier's back\n")
    with Mount(repo, tmp_path / "mnt", cache) as m:
        assert (m.path / "sw/1.0/bin/tool.py").read_bytes() == tool
    assert entry.read_bytes() == tool


def test_a_new_revision_appears_after_the_ttl_while_open_files_keep_their_content(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache", "--max-ttl", "1") as m:
        mountpoint = m.path
        other = mountpoint / "sw/1.0/bin/other.txt"
        held = open(other, "rb")  # noqa: SIM115 - held open across the switch on purpose
        assert os.getxattr(mountpoint, "user.revision") == b"1"
        (src / "bin" / "other.txt").write_text("second release, longer than the first\n")
        (src / "bin" / "added.txt").write_text("new in revision 2\n")
        run_cli("cvmbuild", "publish", src, "--repo", repo.dir,
                "--path", "/sw/1.0")  # fmt: skip
        deadline = time.monotonic() + 15
        while os.getxattr(mountpoint, "user.revision") != b"2":
            assert time.monotonic() < deadline, "the mount never switched to revision 2"
            time.sleep(0.3)
        while not (mountpoint / "sw/1.0/bin/added.txt").exists():
            assert time.monotonic() < deadline, "a new file did not appear"
            time.sleep(0.3)
        # The handle opened at revision 1 still reads revision 1's bytes ...
        assert held.read() == b"untouched\n"
        held.close()
        # ... and a new open reads revision 2 (the kernel drops its stale pages).
        assert other.read_text() == "second release, longer than the first\n"


def republish_other(m: Mount, repo: Repo, src: Path, content: bytes, *, keep_mtime: bool = False,
                    stat_until_switch: bool = False) -> None:  # fmt: skip
    """Publish bin/other.txt with new content and wait until the mount (--max-ttl 1)
    serves revision 2; with stat_until_switch the kernel's attributes of other.txt are
    kept fresh up to the switch, so it still holds revision 1's size afterwards."""
    other = src / "bin" / "other.txt"
    stamp = other.stat().st_mtime_ns
    other.write_bytes(content)
    if keep_mtime:
        os.utime(other, ns=(stamp, stamp))
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw/1.0")
    deadline = time.monotonic() + 15
    while True:
        if stat_until_switch:
            os.stat(m.path / "sw/1.0/bin/other.txt")
        if os.getxattr(m.path, "user.revision") == b"2":  # the switch happens here
            return
        assert time.monotonic() < deadline, "the mount never switched to revision 2"
        time.sleep(0.01 if stat_until_switch else 0.2)


@pytest.fixture
def switching(published: tuple[Repo, Path], tmp_path: Path) -> Iterator[tuple[Mount, Repo, Path]]:
    repo, src = published
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache", "--max-ttl", "1") as m:
        yield m, repo, src


def test_a_file_republished_with_the_same_size_and_mtime_reads_its_new_bytes(
    switching: tuple[Mount, Repo, Path],
) -> None:
    m, repo, src = switching
    other = m.path / "sw/1.0/bin/other.txt"
    assert other.read_bytes() == b"untouched\n"  # now in the kernel's page cache
    republish_other(m, repo, src, b"UNTOUCHED\n", keep_mtime=True)  # only the bytes differ
    assert other.read_bytes() == b"UNTOUCHED\n"


def test_a_file_read_right_after_a_switch_has_its_new_bytes_while_its_old_size_is_cached(
    switching: tuple[Mount, Repo, Path],
) -> None:
    m, repo, src = switching
    other = m.path / "sw/1.0/bin/other.txt"
    assert other.read_bytes() == b"untouched\n"
    republish_other(m, repo, src, b"a much longer second release\n", stat_until_switch=True)
    # The kernel may still believe the old size (10 bytes) until its attribute
    # timeout; the bytes read must be revision 2's all the same, not cut at 10.
    assert other.read_bytes() == b"a much longer second release\n"


def test_handles_on_two_revisions_of_a_file_each_read_their_own_bytes(
    switching: tuple[Mount, Repo, Path],
) -> None:
    m, repo, src = switching
    other = m.path / "sw/1.0/bin/other.txt"
    held = os.open(other, os.O_RDONLY)  # revision 1, not read yet
    try:
        republish_other(m, repo, src, b"UNTOUCHED\n", keep_mtime=True)
        time.sleep(1.2)  # past the attribute timeout: the next stat asks the client
        os.stat(other)
        new = os.open(other, os.O_RDONLY)
        try:
            assert os.pread(held, 4096, 0) == b"untouched\n"  # fills the shared page cache
            assert os.pread(new, 4096, 0) == b"UNTOUCHED\n"
        finally:
            os.close(new)
    finally:
        os.close(held)
    assert other.read_bytes() == b"UNTOUCHED\n"  # not the pages the old handle left


@pytest.mark.parametrize("content", [b"a much longer second release\n", b"short\n"])
def test_an_old_handle_and_a_new_open_are_not_cut_at_each_others_size(
    switching: tuple[Mount, Repo, Path], content: bytes
) -> None:
    m, repo, src = switching
    other = m.path / "sw/1.0/bin/other.txt"
    held = os.open(other, os.O_RDONLY)
    try:
        republish_other(m, repo, src, content)
        time.sleep(1.2)  # past the attribute timeout: the next stat asks the client
        os.stat(other)
        # A short read through the old handle may cut the kernel's size to 10 bytes;
        # a new size must not cut the old handle either.
        assert os.pread(held, 4096, 0) == b"untouched\n"
    finally:
        os.close(held)
    assert other.read_bytes() == content


def test_reading_a_large_file_sequentially_fetches_the_next_chunks_ahead(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = published
    reader = RepositoryReader(DirectoryFetcher(str(repo.dir)), trust_for(repo))
    chunks = reader.catalog_for_dir("/sw/1.0/lib/pkg").chunks("/sw/1.0/lib/pkg/data.bin")
    assert len(chunks) >= 5
    cache = tmp_path / "cache"
    with (
        Mount(repo, tmp_path / "mnt", cache) as m,
        open(m.path / "sw/1.0/lib/pkg/data.bin", "rb") as f,
    ):
        assert f.read(4096) == (src / "lib/pkg/data.bin").read_bytes()[:4096]
        wanted = [cache / "objects" / c.hash[:2] / c.hash[2:] for c in chunks[1:5]]
        deadline = time.monotonic() + 10
        while not all(p.exists() for p in wanted):
            assert time.monotonic() < deadline, "the next chunks were not fetched ahead"
            time.sleep(0.05)


def _stat(mountpoint: Path) -> dict[str, str]:
    out = run_cli("cvmfs-client", "stat", mountpoint).stdout.decode()
    pairs = (ln.split(":", 1) for ln in out.splitlines() if not ln.startswith(" "))
    return {k.strip(): v.split()[0] for k, v in pairs if v.strip()}  # not "requests:"


@pytest.mark.parametrize("prefetch", [True, False])
def test_opening_a_file_fetches_its_neighbours_unless_told_not_to(
    repo: Repo, tmp_path: Path, prefetch: bool
) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    modules = {f"mod{i}.py": f"VALUE = {i}\n".encode() * (i + 1) for i in range(12)}
    modules["ext.so"] = os.urandom(300 * 1024)  # not like mod0.py: fetched after the .py
    for name, data in modules.items():
        (src / "pkg" / name).write_bytes(data)
    (src / "pkg" / "big.bin").write_bytes(os.urandom(3 << 20))  # chunked: read as needed
    (src / "other").mkdir()
    (src / "other" / "far.py").write_text("never opened\n")
    publish = ("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw")
    run_cli(*publish, "--chunk-threshold", "1M")
    options = () if prefetch else ("--no-prefetch",)
    with Mount(repo, tmp_path / "mnt", tmp_path / "cache", *options) as m:
        assert len(os.listdir(m.path / "sw/pkg")) == len(modules) + 1  # loads the catalogs
        before = int(_stat(m.path)["misses"])
        assert (m.path / "sw/pkg/mod0.py").read_bytes() == modules["mod0.py"]
        expected = before + (len(modules) if prefetch else 1)
        deadline = time.monotonic() + 10
        while int(_stat(m.path)["misses"]) < expected:
            assert time.monotonic() < deadline, _stat(m.path)
            time.sleep(0.05)
        time.sleep(0.3)
        assert int(_stat(m.path)["misses"]) == expected  # not big.bin, not other/
        for name, text in modules.items():
            assert (m.path / "sw/pkg" / name).read_bytes() == text
        assert int(_stat(m.path)["misses"]) == before + len(modules)


def test_the_mount_raises_its_open_files_limit(
    published: tuple[Repo, Path], tmp_path: Path
) -> None:
    """A service starts with 1,024 open files; a walk of a repository with thousands of
    nested catalogs holds one open file per catalog."""
    repo, _ = published
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the mount command inherits it
    try:
        with Mount(repo, tmp_path / "mnt", tmp_path / "cache") as m:
            pid = json.loads(os.getxattr(m.path, "user.stats"))["pid"]
            limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(ln for ln in limits if ln.startswith("Max open files"))
    assert int(line.split()[3]) == min(hard, 131072)
