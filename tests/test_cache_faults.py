"""The cache under a running mount: entries removed or changed behind its back cost a
fetch, never a wrong byte or an error; one mount per cache directory; and a chunk list
with a gap, or a size beyond the object, is an error everywhere, never a short read."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from cvmfs_format.catalog import FLAG_CHUNKED, Chunk
from cvmfs_format.catalog_writer import CatalogBuilder, Subtree
from tests.conftest import MiB, Repo, mounted, open_reader, run_cli

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None,
    reason="needs /dev/fuse and fusermount (apt-get install fuse libfuse2)",
)

RELEASE = "/sw/1.0"


def make_release(root: Path) -> dict[str, bytes]:
    """A small release: scripts, a 9 MiB file cut into chunks, a nested catalog."""
    files = {
        "bin/setup.sh": b"export SW=1.0\n",
        "bin/other.txt": b"untouched\n",
        "lib/data.bin": os.urandom(9 * MiB),
        "lib/plugins/.cvmfscatalog": b"",
        "lib/plugins/muon.py": b"def reconstruct(): return 'muon'\n",
    }
    for relpath, content in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(content)
    return files


@pytest.fixture
def release(repo: Repo, tmp_path: Path) -> dict[str, bytes]:
    src = tmp_path / "release"
    files = make_release(src)
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", RELEASE)
    return files


def read_through_fuse(path: Path) -> bytes:
    """A file's bytes as the mount serves them now, not as the kernel cached them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        parts = []
        while part := os.read(fd, MiB):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def stats(mountpoint: Path) -> dict[str, object]:
    return json.loads(os.getxattr(mountpoint, "user.stats"))


def entry_path(cache: Path, digest: str) -> Path:
    return cache / "objects" / digest[:2] / digest[2:]


def entry_of(cache: Path, content: bytes) -> Path:
    return entry_path(cache, hashlib.sha256(content).hexdigest())


def assert_reads_the_release(mountpoint: Path, files: dict[str, bytes]) -> None:
    for relpath, content in files.items():
        assert read_through_fuse(mountpoint / RELEASE[1:] / relpath) == content, relpath


def test_files_whose_cache_entries_an_admin_removed_are_fetched_again(
    repo: Repo, release: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with mounted(str(repo.dir), tmp_path / "mnt", cache, repo.pub, "--no-prefetch") as mnt:
        assert read_through_fuse(mnt / "sw/1.0/bin/setup.sh") == release["bin/setup.sh"]
        assert read_through_fuse(mnt / "sw/1.0/lib/data.bin") == release["lib/data.bin"]
        # rm -rf of everything in the cache, the temporary directory included.
        subprocess.run(f"rm -rf {cache}/objects/*", shell=True, check=True)
        assert list((cache / "objects").iterdir()) == []
        assert_reads_the_release(mnt, release)  # the nested catalog too, first read now
        assert stats(mnt)["io_errors"] == 0
        assert entry_of(cache, release["bin/setup.sh"]).exists()


def test_cache_clean_from_another_process_under_a_mount_costs_a_fetch_not_an_error(
    repo: Repo, release: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with mounted(str(repo.dir), tmp_path / "mnt", cache, repo.pub) as mnt:
        assert_reads_the_release(mnt, release)
        before = stats(mnt)["misses"]
        out = run_cli("cvmfs-client", "cache", "clean", "--cache-dir", cache).stdout.decode()
        assert out.startswith("cache cleaned: ")
        assert not entry_of(cache, release["bin/setup.sh"]).exists()
        assert_reads_the_release(mnt, release)
        after = stats(mnt)
        assert after["io_errors"] == 0 and after["misses"] > before  # type: ignore[operator]


def test_a_second_mount_on_a_cache_directory_in_use_is_refused(
    repo: Repo, release: dict[str, bytes], tmp_path: Path
) -> None:
    cache, second = tmp_path / "cache", tmp_path / "mnt2"
    second.mkdir()
    with mounted(str(repo.dir), tmp_path / "mnt1", cache, repo.pub) as mnt:
        result = run_cli(
            "cvmfs-client", "mount", repo.dir, second, "--key", repo.pub, "--cache-dir", cache,
            check=False,
        )  # fmt: skip
        if os.path.ismount(second):  # the fault: do not leave it behind
            subprocess.run(["umount", "-l", str(second)], capture_output=True)
        assert result.returncode == 1
        stderr = result.stderr.decode()
        assert stderr.startswith(f"error: {cache}: ") and stderr.count("\n") == 1, stderr
        assert "give each mount its own --cache-dir" in stderr
        assert not os.path.ismount(second)
        assert_reads_the_release(mnt, release)
        # Once the first mount is gone, the cache directory is free again at once.
        run_cli("cvmfs-client", "umount", mnt)
        with mounted(str(repo.dir), second, cache, repo.pub) as again:
            assert_reads_the_release(again, release)


def test_two_repositories_mounted_with_the_default_cache_get_one_cache_each(
    repo: Repo, release: dict[str, bytes], tmp_path: Path
) -> None:
    """As CernVM-FS does: the cache base holds one cache per repository, each with its own
    quota, so two mounts never evict each other's entries."""
    other = Repo(tmp_path / "other", tmp_path / "other.keys", "other.example.org")
    run_cli("repo-server", "init", other.dir, "--name", other.name)
    big = {"big.bin": os.urandom(6 * MiB), "small.txt": b"other\n"}
    (tmp_path / "other-src").mkdir()
    for name, content in big.items():
        (tmp_path / "other-src" / name).write_bytes(content)
    run_cli("cvmbuild", "publish", tmp_path / "other-src", "--repo", other.dir, "--path", "/o")
    base = tmp_path / "cache-base"
    mounts = []
    for r in (repo, other):
        conf = tmp_path / f"{r.name}.conf"
        conf.write_text(
            f"CVMFS_SERVER_URL={r.dir}\nCVMFS_PUBLIC_KEY={r.pub}\nCVMFS_CACHE_BASE={base}\n"
            "CVMFS_QUOTA_LIMIT=4\n"
        )
        mountpoint = tmp_path / f"mnt-{r.name}"
        mountpoint.mkdir()
        run_cli("cvmfs-client", "mount", mountpoint, "--config", conf, "--no-prefetch")
        mounts.append(mountpoint)
    try:
        for _ in range(2):  # each read evicts under its own quota, never the other's
            assert_reads_the_release(mounts[0], release)
            for name, content in big.items():
                assert read_through_fuse(mounts[1] / "o" / name) == content
        first, second = stats(mounts[0]), stats(mounts[1])
        assert first["cache_dir"] == str(base / repo.name / "objects")
        assert second["cache_dir"] == str(base / other.name / "objects")
        assert first["io_errors"] == second["io_errors"] == 0
    finally:
        for mountpoint in mounts:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def flip(path: Path) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def swap(path: Path) -> None:
    """Another valid entry renamed over this one (a different object's bytes)."""
    stranger = path.with_name("stranger")
    stranger.write_bytes(b"untouched\n")
    os.rename(stranger, path)


CHANGES = {"flipped": flip, "truncated": truncate, "swapped": swap}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_cache_entry_changed_under_a_mount_is_caught_on_the_next_open(
    repo: Repo, release: dict[str, bytes], tmp_path: Path, change: str
) -> None:
    cache = tmp_path / "cache"
    with mounted(str(repo.dir), tmp_path / "mnt", cache, repo.pub) as mnt:
        setup = release["bin/setup.sh"]
        assert read_through_fuse(mnt / "sw/1.0/bin/setup.sh") == setup
        time.sleep(0.01)  # a later change time than the verification's, on any clock tick
        CHANGES[change](entry_of(cache, setup))
        assert read_through_fuse(mnt / "sw/1.0/bin/setup.sh") == setup
        assert stats(mnt)["corrupt_entries"] == 1
        assert entry_of(cache, setup).read_bytes() == setup


def test_cache_verify_under_a_mount_removes_changed_entries_and_the_mount_fetches_them(
    repo: Repo, release: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with mounted(str(repo.dir), tmp_path / "mnt", cache, repo.pub) as mnt:
        assert_reads_the_release(mnt, release)
        reader = open_reader(repo)
        chunk = reader.chunks(reader.lookup(f"{RELEASE}/lib/data.bin"))[1]
        changed = [entry_of(cache, release["bin/setup.sh"]), entry_path(cache, chunk.hash)]
        flip(changed[0])
        truncate(changed[1])
        verify = run_cli("cvmfs-client", "cache", "verify", "--cache-dir", cache, check=False)
        assert verify.returncode == 3  # found corruption (and removed it)
        out = verify.stdout.decode()
        for path in changed:
            assert f"removed corrupt entry {path.parent.name}{path.name}" in out
            assert not path.exists()
        assert_reads_the_release(mnt, release)
        assert stats(mnt)["io_errors"] == 0


# -- a chunked file whose chunk list does not cover it -----------------------------------


def sign_hostile_file(
    repo: Repo, path: str, size: int, digest: str | None, chunks: list[Chunk]
) -> None:
    """A new revision with one more file, as a hostile or buggy publisher could sign it:
    whatever size, object and chunk rows it is given (the catalog writer checks none)."""
    parent, name = path.rsplit("/", 1)
    builder = CatalogBuilder(parent)
    flags = FLAG_CHUNKED if chunks else 0
    builder.add_entries([(parent, name, 0o100644, size, 0, digest, None, 0, flags)])
    builder.add_chunks([(path, c.offset, c.size, c.hash) for c in chunks])
    repository = repo.open()
    compressor = zstandard.ZstdCompressor()
    with repository.lock():
        subtree = Subtree(parent, builder.finish(repository.storage, compressor), 0o40755, 0)
        repository.commit(subtree, compressor=compressor)


@pytest.fixture
def gap(repo: Repo, release: dict[str, bytes]) -> str:
    """/sw/gap/broken.bin: data.bin's size and chunk list with one chunk left out."""
    reader = open_reader(repo)
    data = reader.lookup(f"{RELEASE}/lib/data.bin")
    chunks = reader.chunks(data)
    assert len(chunks) >= 3
    del chunks[1]
    sign_hostile_file(repo, "/sw/gap/broken.bin", data.size, None, chunks)
    return "/sw/gap/broken.bin"


def test_a_chunked_file_with_a_gap_in_its_chunk_list_is_an_io_error_through_the_mount(
    repo: Repo, release: dict[str, bytes], gap: str, tmp_path: Path
) -> None:
    with mounted(str(repo.dir), tmp_path / "mnt", tmp_path / "cache", repo.pub) as mnt:
        with pytest.raises(OSError) as raised:
            read_through_fuse(mnt / gap[1:])
        assert raised.value.errno == errno.EIO
        assert stats(mnt)["io_errors"] == 1
        assert_reads_the_release(mnt, release)  # the other files are fine


def test_cat_and_preload_refuse_a_chunked_file_with_a_gap(
    repo: Repo, gap: str, tmp_path: Path
) -> None:
    cat = run_cli("cvmfs-client", "cat", repo.dir, gap, "--key", repo.pub, check=False)
    assert cat.returncode == 1 and cat.stdout == b""
    assert cat.stderr.decode().startswith(f"error: {gap}: chunk list has a gap")
    preload = run_cli(
        "cvmfs-client", "preload", repo.dir, tmp_path / "cache", "--key", repo.pub,
        "--path", "/sw", check=False,
    )  # fmt: skip
    assert preload.returncode == 1
    assert preload.stderr.decode().startswith(f"error: {gap}: chunk list has a gap")


def test_a_file_larger_than_its_cached_object_is_an_io_error_never_a_short_read(
    repo: Repo, release: dict[str, bytes], tmp_path: Path
) -> None:
    """The object is in the cache already (another file has it, with its true size): the
    size the catalog gives is checked against the entry's all the same."""
    setup = release["bin/setup.sh"]
    digest = hashlib.sha256(setup).hexdigest()
    sign_hostile_file(repo, "/sw/liar/setup.sh", len(setup) + 100, digest, [])
    with mounted(str(repo.dir), tmp_path / "mnt", tmp_path / "cache", repo.pub) as mnt:
        assert read_through_fuse(mnt / "sw/1.0/bin/setup.sh") == setup
        with pytest.raises(OSError) as raised:
            read_through_fuse(mnt / "sw/liar/setup.sh")
        assert raised.value.errno == errno.EIO
