"""A build tree published with `cvmbuild` reads back exactly, through the verified reader
and through `cvmfs-client`; re-publishing stores only what changed."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import stat
from pathlib import Path

import pytest

from cvmfs_format.catalog import Entry
from cvmfs_format.errors import NotFoundError
from tests.conftest import (
    MiB,
    Repo,
    open_reader,
    publish,
    read_back,
    read_tree,
    run_cli,
    write_build_tree,
)

# Distinct, deliberately odd timestamps: nanoseconds must survive the round trip.
MTIME_NS = 1_234_567_890_123_456_789


# -- helpers shared with test_tamper.py -----------------------------------------------


def client(repo: Repo, command: str, path: str, *extra: str, check: bool = True) -> bytes:
    result = run_cli(
        "cvmfs-client", command, repo.dir, path, "--key", repo.pub, *extra, check=check
    )
    return result.stdout if check else result.stderr


def object_files(repo: Repo) -> dict[str, int]:
    """Every object file on disk: hash → stored size."""
    found = {}
    for sub in (repo.dir / "data").iterdir():
        for obj in sub.iterdir():
            found[sub.name + obj.name] = obj.stat().st_size
    return found


# -- the build tree -------------------------------------------------------------------


def make_build_tree(src: Path) -> None:
    """Every kind of entry a build tree can hold, with modes and mtimes set on purpose."""
    rng = random.Random(1)
    src.mkdir()
    (src / "empty.txt").write_bytes(b"")
    (src / "README").write_text("hello world\n")
    (src / "big.bin").write_bytes(rng.randbytes(6 * MiB))  # over the 4 MiB chunk threshold
    (src / "bin").mkdir()
    (src / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (src / "bin" / "tool").chmod(0o755)
    (src / "bin" / "suid-helper").write_bytes(b"\x7fELF pretend")
    (src / "bin" / "suid-helper").chmod(0o4755)
    (src / "secret.conf").write_text("password=hunter2\n")
    (src / "secret.conf").chmod(0o600)
    (src / "share" / "doc" / "deep").mkdir(parents=True)
    (src / "share" / "doc" / "deep" / "notes.txt").write_text("nested\n" * 100)
    (src / "empty-dir").mkdir()
    (src / "lib" / "python" / "empty-leaf").mkdir(parents=True)
    (src / "links").mkdir()
    os.symlink("../README", src / "links" / "relative")
    os.symlink("no/such/file", src / "links" / "dangling")
    os.symlink("/etc/passwd", src / "links" / "absolute")
    os.symlink("../bin", src / "links" / "to-dir")
    (src / "hard").mkdir()
    (src / "hard" / "a").write_bytes(b"one inode, two names\n")
    os.link(src / "hard" / "a", src / "hard" / "b")

    # Children first, so that setting a directory's mtime is the last change to it.
    for offset, (dirpath, dirnames, filenames) in enumerate(os.walk(src, topdown=False)):
        for i, name in enumerate(sorted(dirnames + filenames)):
            when = MTIME_NS + offset * 1_000_003 + i * 7
            os.utime(os.path.join(dirpath, name), ns=(when, when), follow_symlinks=False)
    os.utime(src, ns=(MTIME_NS, MTIME_NS))


def source_entries(src: Path) -> dict[str, os.stat_result]:
    """relpath → lstat of everything under src (never following symlinks)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, src)] = os.lstat(full)
    return found


@pytest.fixture
def build_tree(tmp_path: Path) -> Path:
    src = tmp_path / "build"
    make_build_tree(src)
    return src


# -- the round trip -------------------------------------------------------------------


def test_every_kind_of_entry_reads_back_exactly(build_tree: Path, repo: Repo) -> None:
    code, out, _ = publish(build_tree, repo, "/sw/1.0", "--message", "first release")
    assert code == 0
    assert re.match(r"published revision 1 at /sw/1.0: 9 files", out), out

    reader = open_reader(repo)
    top = reader.lookup("/sw/1.0")
    assert top.is_dir and top.mtime_ns == MTIME_NS
    assert top.mode == os.lstat(build_tree).st_mode

    expected = source_entries(build_tree)
    for relpath, st in expected.items():
        entry = reader.lookup(f"/sw/1.0/{relpath}")
        assert entry.mode == st.st_mode, relpath
        assert entry.mtime_ns == st.st_mtime_ns, relpath
        if stat.S_ISLNK(st.st_mode):
            assert entry.target == os.readlink(build_tree / relpath), relpath
            assert entry.size == len(os.readlink(build_tree / relpath).encode())
        elif stat.S_ISREG(st.st_mode):
            assert entry.size == st.st_size, relpath
            assert read_back(reader, entry.path) == (build_tree / relpath).read_bytes(), relpath
        else:
            names = sorted(os.listdir(build_tree / relpath))
            assert [e.name for e in reader.listdir(entry.path)] == names, relpath

    assert [e.name for e in reader.listdir("/sw/1.0")] == sorted(os.listdir(build_tree))
    assert stat.S_IMODE(reader.lookup("/sw/1.0/bin/suid-helper").mode) == 0o4755
    assert stat.S_IMODE(reader.lookup("/sw/1.0/secret.conf").mode) == 0o600


def test_the_chunking_threshold_takes_sizes_with_units(tmp_path: Path, repo: Repo) -> None:
    (tmp_path / "src").mkdir()
    data = random.Random(5).randbytes(3 * MiB)
    (tmp_path / "src" / "lib.so").write_bytes(data)
    publish(tmp_path / "src", repo, "/sw", "--chunk-threshold", "1M")
    reader = open_reader(repo)
    entry = reader.lookup("/sw/lib.so")
    assert entry.chunked and len(reader.chunks(entry)) >= 2
    assert read_back(reader, "/sw/lib.so") == data
    bad = run_cli(
        "cvmbuild", "publish", tmp_path / "src", "--repo", repo.dir, "--path", "/sw",
        "--chunk-threshold", "1X", check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and b"size '1X'" in bad.stderr


def test_large_files_are_chunked_and_reassembled(build_tree: Path, repo: Repo) -> None:
    publish(build_tree, repo, "/sw")
    reader = open_reader(repo)
    big: Entry = reader.lookup("/sw/big.bin")
    assert big.chunked
    chunks = reader.catalog_for_dir("/sw").chunks("/sw/big.bin")
    assert len(chunks) > 1
    assert sum(c.size for c in chunks) == big.size == 6 * MiB
    assert read_back(reader, "/sw/big.bin") == (build_tree / "big.bin").read_bytes()
    assert not reader.lookup("/sw/README").chunked


def test_symlinks_are_stored_never_followed(build_tree: Path, repo: Repo) -> None:
    publish(build_tree, repo, "/sw")
    reader = open_reader(repo)
    absolute = reader.lookup("/sw/links/absolute")
    assert absolute.is_symlink and absolute.target == "/etc/passwd"
    assert reader.lookup("/sw/links/dangling").target == "no/such/file"
    to_dir = reader.lookup("/sw/links/to-dir")
    assert to_dir.is_symlink and not to_dir.is_dir
    with pytest.raises(NotFoundError):
        list(reader.iter_content(absolute))  # a symlink has no content of its own


def test_hard_links_share_a_link_group(build_tree: Path, repo: Repo) -> None:
    publish(build_tree, repo, "/sw")
    reader = open_reader(repo)
    a, b = reader.lookup("/sw/hard/a"), reader.lookup("/sw/hard/b")
    assert a.link_group != 0 and a.link_group == b.link_group
    assert reader.link_count(a) == reader.link_count(b) == 2
    assert a.hash == b.hash
    assert reader.link_count(reader.lookup("/sw/README")) == 1


def test_the_client_command_line_reads_what_was_published(build_tree: Path, repo: Repo) -> None:
    publish(build_tree, repo, "/sw")
    assert client(repo, "cat", "/sw/big.bin") == (build_tree / "big.bin").read_bytes()
    assert client(repo, "cat", "/sw/empty.txt") == b""
    assert client(repo, "cat", "/sw/secret.conf") == b"password=hunter2\n"

    names = client(repo, "ls", "/sw").decode().split()
    assert names == sorted(os.listdir(build_tree))
    long_listing = client(repo, "ls", "/sw/links", "-l").decode()
    assert "dangling -> no/such/file" in long_listing
    assert "absolute -> /etc/passwd" in long_listing
    assert long_listing.startswith("lrwxrwxrwx")
    suid_line = client(repo, "ls", "/sw/bin/suid-helper", "-l").decode()
    assert suid_line.startswith("-rwsr-xr-x")

    err = client(repo, "cat", "/sw/no-such-file", check=False).decode()
    assert err.startswith("error: ") and "/sw/no-such-file" in err


# -- publishing again -----------------------------------------------------------------


def _new_objects_of(repo: Repo, before: dict[str, int]) -> dict[str, int]:
    return {h: s for h, s in object_files(repo).items() if h not in before}


def test_publishing_an_unchanged_tree_uploads_nothing_new(build_tree: Path, repo: Repo) -> None:
    publish(build_tree, repo, "/sw")
    before = object_files(repo)

    _, out, _ = publish(build_tree, repo, "/sw")

    assert "published revision 2 at /sw" in out
    assert re.search(r"; new .* stored \(0 objects, 0 catalogs\)", out), out
    manifest = open_reader(repo).manifest
    assert manifest is not None
    # Only the bookkeeping of the new revision itself is written.
    assert set(_new_objects_of(repo, before)) <= {manifest.history_hash, manifest.root_hash}


def test_publishing_again_without_the_stat_cache_stores_no_new_objects(
    build_tree: Path, repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh build machine (no stat cache) re-reads the files but stores nothing new."""
    publish(build_tree, repo, "/sw")
    before = object_files(repo)
    monkeypatch.setenv("CVMBUILD_CACHE_DIR", str(tmp_path / "other-machine-cache"))

    _, out, _ = publish(build_tree, repo, "/sw")

    assert re.search(r"\(0 objects, 0 catalogs\); dedup 100.0%", out), out
    manifest = open_reader(repo).manifest
    assert manifest is not None
    assert set(_new_objects_of(repo, before)) <= {manifest.history_hash, manifest.root_hash}


def test_two_prefixes_live_side_by_side(tmp_path: Path, repo: Repo) -> None:
    tools, data = tmp_path / "tools", tmp_path / "data"
    for src, text in ((tools, "tools v1\n"), (data, "calibration\n")):
        src.mkdir()
        (src / "VERSION").write_text(text)

    publish(tools, repo, "/sw/tools/1.0")
    publish(data, repo, "/conditions")

    reader = open_reader(repo)
    assert read_back(reader, "/sw/tools/1.0/VERSION") == b"tools v1\n"
    assert read_back(reader, "/conditions/VERSION") == b"calibration\n"
    assert [e.name for e in reader.listdir("/")] == ["conditions", "sw"]
    assert reader.lookup("/sw/tools").is_dir


def test_republishing_a_prefix_replaces_it_and_leaves_others_alone(
    tmp_path: Path, repo: Repo
) -> None:
    app, other = tmp_path / "app", tmp_path / "other"
    app.mkdir()
    (app / "keep.txt").write_text("kept\n")
    (app / "old.txt").write_text("to be deleted\n")
    (app / "olddir").mkdir()
    (app / "olddir" / "x").write_text("x\n")
    other.mkdir()
    (other / "data.txt").write_text("untouched\n")
    publish(app, repo, "/sw/app")
    publish(other, repo, "/sw/other")
    other_catalog_before = open_reader(repo).catalog_for_dir("/sw/other").digest

    (app / "old.txt").unlink()
    (app / "olddir" / "x").unlink()
    (app / "olddir").rmdir()
    (app / "new.txt").write_text("added\n")
    (app / "keep.txt").write_text("kept, edited\n")
    publish(app, repo, "/sw/app", "--replace")  # old.txt and olddir go on purpose

    reader = open_reader(repo)
    assert [e.name for e in reader.listdir("/sw/app")] == ["keep.txt", "new.txt"]
    for gone in ("/sw/app/old.txt", "/sw/app/olddir", "/sw/app/olddir/x"):
        with pytest.raises(NotFoundError):
            reader.lookup(gone)
    assert read_back(reader, "/sw/app/keep.txt") == b"kept, edited\n"
    assert read_back(reader, "/sw/other/data.txt") == b"untouched\n"
    assert reader.catalog_for_dir("/sw/other").digest == other_catalog_before
    err = client(repo, "cat", "/sw/app/old.txt", check=False).decode()
    assert err.startswith("error: ")


def test_a_tag_keeps_reading_the_tagged_release(tmp_path: Path, repo: Repo) -> None:
    src = tmp_path / "release"
    src.mkdir()
    (src / "VERSION").write_text("1.0\n")
    publish(src, repo, "/sw", "--tag", "v1.0", "--message", "release 1.0")
    (src / "VERSION").write_text("2.0-dev\n")
    (src / "added-later").write_text("new\n")
    publish(src, repo, "/sw")

    assert client(repo, "cat", "/sw/VERSION") == b"2.0-dev\n"
    assert client(repo, "cat", "/sw/VERSION", "--tag", "v1.0") == b"1.0\n"
    assert client(repo, "cat", "/sw/VERSION", "--revision", "1") == b"1.0\n"
    err = client(repo, "cat", "/sw/added-later", "--tag", "v1.0", check=False).decode()
    assert err.startswith("error: ")
    tags = run_cli("repo-server", "tags", repo.dir).stdout.decode()
    assert tags.startswith("v1.0\trevision 1\t")


# -- nested catalogs ------------------------------------------------------------------


def _catalog_count(repo: Repo) -> int:
    out = run_cli("repo-server", "info", repo.dir).stdout.decode()
    match = re.search(r"^catalogs:\s+(\d+)$", out, re.MULTILINE)
    assert match, out
    return int(match.group(1))


def test_a_cvmfscatalog_marker_makes_a_nested_catalog(tmp_path: Path, repo: Repo) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "lib").mkdir(parents=True)
    (src / "pkg" / ".cvmfscatalog").write_bytes(b"")
    (src / "pkg" / "lib" / "libfoo.so").write_bytes(b"\x7fELF foo")
    (src / "top.txt").write_text("top\n")
    publish(src, repo, "/sw")

    reader = open_reader(repo)
    pkg_catalog = reader.catalog_for_dir("/sw/pkg")
    assert pkg_catalog.root == "/sw/pkg"
    assert pkg_catalog.digest != reader.catalog_for_dir("/sw").digest
    assert reader.catalog_for_dir("/sw/pkg/lib").digest == pkg_catalog.digest
    assert read_back(reader, "/sw/pkg/lib/libfoo.so") == b"\x7fELF foo"
    assert read_back(reader, "/sw/top.txt") == b"top\n"
    # root catalog, the /sw catalog and the /sw/pkg catalog
    assert _catalog_count(repo) == 3


def test_a_large_tree_is_split_into_several_catalogs(tmp_path: Path, repo: Repo) -> None:
    src = tmp_path / "src"
    for d in range(6):
        (src / f"pkg{d}").mkdir(parents=True)
        for f in range(50):
            (src / f"pkg{d}" / f"file{f:03}").write_text(f"{d}/{f}\n")
    publish(src, repo, "/sw", "--catalog-entries", "50")

    assert _catalog_count(repo) >= 6
    reader = open_reader(repo)
    roots = {reader.catalog_for_dir(f"/sw/pkg{d}").root for d in range(6)}
    assert roots == {f"/sw/pkg{d}" for d in range(6)}
    for d in range(6):
        names = [e.name for e in reader.listdir(f"/sw/pkg{d}")]
        assert names == [f"file{f:03}" for f in range(50)]
        for f in (0, 25, 49):
            assert read_back(reader, f"/sw/pkg{d}/file{f:03}") == f"{d}/{f}\n".encode()
    assert client(repo, "cat", "/sw/pkg5/file049") == b"5/49\n"
    run_cli("repo-server", "check", repo.dir)


def test_lookups_stay_right_when_the_listing_cache_overflows(tmp_path: Path, repo: Repo) -> None:
    tree = write_build_tree(tmp_path / "src", seed=7, small_files=450, big_files=1)
    publish(tmp_path / "src", repo, "/sw")
    # Room for fewer rows than one directory holds: every listing evicts the one before.
    reader = open_reader(repo, cached_entries=10)
    for _ in range(2):
        assert read_tree(reader, "/sw") == tree
        for path in sorted(tree)[::37]:
            assert reader.lookup(f"/sw/{path}").size == len(tree[path])
        with pytest.raises(NotFoundError):
            reader.lookup("/sw/lib000/missing")
    assert reader._view.held <= 10 or len(reader._view.listings) == 1


# -- large files ----------------------------------------------------------------------


def test_editing_the_middle_of_a_large_file_stores_only_nearby_chunks(
    tmp_path: Path, repo: Repo
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 64 * MiB
    (src / "detector.db").write_bytes(random.Random(64).randbytes(size))
    publish(src, repo, "/data")
    before = object_files(repo)

    with open(src / "detector.db", "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x00" * 100)
    _, out, _ = publish(src, repo, "/data")

    added = _new_objects_of(repo, before)
    assert sum(added.values()) < 0.05 * size, out
    expected = hashlib.sha256((src / "detector.db").read_bytes()).hexdigest()
    reader = open_reader(repo)
    digest = hashlib.sha256()
    for piece in reader.iter_content(reader.lookup("/data/detector.db")):
        digest.update(piece)
    assert digest.hexdigest() == expected


# -- what cannot be published ---------------------------------------------------------


def _tree_with_one_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine\n")
    return src


def test_a_fifo_is_refused_with_its_path(tmp_path: Path, repo: Repo) -> None:
    src = _tree_with_one_file(tmp_path)
    os.mkfifo(src / "pipe")
    code, out, err = publish(src, repo, "/sw", check=False)
    assert code == 1
    assert err.startswith("error: ") and str(src / "pipe") in err and "fifo" in err
    assert "--skip-special" in err
    assert open_reader(repo).manifest.revision == 0  # type: ignore[union-attr]


def test_a_socket_is_refused_unless_skipped(
    tmp_path: Path, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _tree_with_one_file(tmp_path)
    monkeypatch.chdir(src)  # socket paths are limited to 108 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("daemon.sock")
        code, _, err = publish(src, repo, "/sw", check=False)
        assert code == 1
        assert err.startswith("error: ") and str(src / "daemon.sock") in err
        assert "socket" in err

        code, _, err = publish(src, repo, "/sw", "--skip-special")
    assert code == 0
    assert "warning" in err and str(src / "daemon.sock") in err
    reader = open_reader(repo)
    assert [e.name for e in reader.listdir("/sw")] == ["ok.txt"]


def test_a_name_that_is_not_utf8_is_refused(tmp_path: Path, repo: Repo) -> None:
    src = _tree_with_one_file(tmp_path)
    fd = os.open(os.fsencode(src) + b"/bad-\xff-name", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    code, _, err = publish(src, repo, "/sw", check=False)
    assert code == 1
    assert err.startswith("error: ")
    assert "bad-\\xff-name" in err and "UTF-8" in err


def test_a_symlink_target_that_is_not_utf8_is_refused(tmp_path: Path, repo: Repo) -> None:
    src = _tree_with_one_file(tmp_path)
    os.symlink(b"target-\xfe", os.fsencode(src) + b"/link")
    code, _, err = publish(src, repo, "/sw", check=False)
    assert code == 1
    assert err.startswith("error: ") and "link" in err and "UTF-8" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_an_unreadable_directory_is_refused(tmp_path: Path, repo: Repo) -> None:
    src = _tree_with_one_file(tmp_path)
    (src / "private").mkdir()
    (src / "private").chmod(0)
    try:
        code, _, err = publish(src, repo, "/sw", check=False)
    finally:
        (src / "private").chmod(0o755)
    assert code == 1
    assert err.startswith("error: ") and str(src / "private") in err
