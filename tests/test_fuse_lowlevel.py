"""The libfuse3 low-level binding on its own: a tiny in-memory tree mounted for real,
read through the kernel with ordinary system calls."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cvmfs_client.fuse_lowlevel import ROOT_INODE, AddEntry, Attr, Reply, Session, set_read_ahead

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="needs /dev/fuse and root (the binding mounts without fusermount3)",
)

MTIME = 1_600_000_000_123_456_789
BIG = bytes(range(256)) * (3 * 4096)  # 3 MiB
DAY = 86400.0


class TinyFS:
    """/hello.txt, /big.bin, /sub/link -> ../hello.txt, /many/f0000..f2999, /broken."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.read_sizes: list[int] = []
        self.lookups: Counter[int] = Counter()  # inode -> lookups not yet forgotten
        self.lock = threading.Lock()
        self.nodes: dict[int, tuple[str, int, bytes]] = {
            ROOT_INODE: ("/", stat.S_IFDIR | 0o755, b""),
            2: ("/hello.txt", stat.S_IFREG | 0o644, b"hello, kernel\n"),
            3: ("/big.bin", stat.S_IFREG | 0o644, BIG),
            4: ("/sub", stat.S_IFDIR | 0o755, b""),
            5: ("/sub/link", stat.S_IFLNK | 0o777, b"../hello.txt"),
            6: ("/many", stat.S_IFDIR | 0o755, b""),
            7: ("/broken", stat.S_IFREG | 0o644, b"never served\n"),
        }
        for i in range(3000):
            self.nodes[100 + i] = (f"/many/f{i:04}", stat.S_IFREG | 0o600, b"x" * i)
        self.by_path = {path: ino for ino, (path, _, _) in self.nodes.items()}

    def attr(self, ino: int) -> Attr:
        _, mode, data = self.nodes[ino]
        return Attr(ino, mode, len(data), 2 if stat.S_ISDIR(mode) else 1, MTIME)

    def children(self, ino: int) -> list[int]:
        prefix = self.nodes[ino][0].rstrip("/") + "/"
        return sorted(
            i
            for i, (p, _, _) in self.nodes.items()
            if p.startswith(prefix) and "/" not in p[len(prefix) :] and i != ino
        )

    def init(self) -> None:
        self.calls["init"] += 1

    def lookup(self, parent: int, name: bytes) -> Reply:
        self.calls["lookup"] += 1
        path = self.nodes[parent][0].rstrip("/") + "/" + name.decode()
        ino = self.by_path.get(path, 0)
        if ino:
            with self.lock:
                self.lookups[ino] += 1
        return Reply(self.attr(ino) if ino else Attr(0, 0, 0, 0, 0), DAY, DAY)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        with self.lock:
            for ino, count in items:
                self.lookups[ino] -= count

    def getattr(self, ino: int) -> tuple[Attr, float]:
        self.calls["getattr"] += 1
        return self.attr(ino), DAY

    def readlink(self, ino: int) -> bytes:
        return self.nodes[ino][2]

    def read(self, ino: int, buffer: memoryview, offset: int) -> int:
        self.calls["read"] += 1
        self.read_sizes.append(len(buffer))
        if self.nodes[ino][0] == "/broken":
            raise ValueError("a bug in the handler")
        data = self.nodes[ino][2][offset : offset + len(buffer)]
        buffer[: len(data)] = data
        return len(data)

    def readdir(self, ino: int, offset: int, add: AddEntry, plus: bool) -> None:
        self.calls["readdirplus" if plus else "readdir"] += 1
        names = [(b".", ino), (b"..", ino)] + [
            (self.nodes[c][0].rpartition("/")[2].encode(), c) for c in self.children(ino)
        ]
        for index in range(offset, len(names)):
            name, child = names[index]
            if not add(name, Reply(self.attr(child), DAY, DAY), index + 1):
                return
            if plus and name not in (b".", b".."):
                with self.lock:
                    self.lookups[child] += 1

    def statfs(self, ino: int) -> tuple[int, int]:
        return 4096, 255

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name == b"user.long":
            return b"v" * 300
        if name == b"user.name":
            return self.nodes[ino][0].encode()
        raise OSError(errno.ENODATA, "none")

    def listxattr(self, ino: int) -> list[bytes]:
        return [b"user.long", b"user.name"]


def mount(fs: TinyFS, mountpoint: Path, readdirplus: bool = False) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    session = Session(
        fs, str(mountpoint), ["ro", "fsname=tiny", "default_permissions"], readdirplus
    )
    session.mount()
    thread = threading.Thread(target=session.loop, kwargs={"signals": False}, daemon=True)
    thread.start()
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        thread.join(10)
        session.close()


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[tuple[TinyFS, Path]]:
    fs = TinyFS()
    for mnt in mount(fs, tmp_path / "mnt"):
        yield fs, mnt


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_files_links_and_attributes_read_as_the_tree_has_them(tiny: tuple[TinyFS, Path]) -> None:
    fs, mnt = tiny
    assert (mnt / "hello.txt").read_bytes() == b"hello, kernel\n"
    st = os.lstat(mnt / "hello.txt")
    assert (st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns) == (
        stat.S_IFREG | 0o644, 14, 1, MTIME
    )  # fmt: skip
    assert stat.S_ISDIR(os.lstat(mnt / "sub").st_mode)
    assert os.readlink(mnt / "sub" / "link") == "../hello.txt"
    assert (mnt / "sub" / "link").read_bytes() == b"hello, kernel\n"
    assert (mnt / "big.bin").read_bytes() == BIG
    assert fs.calls["init"] == 1


def test_a_listing_of_thousands_of_entries_comes_whole_and_in_order(
    tiny: tuple[TinyFS, Path],
) -> None:
    fs, mnt = tiny
    with os.scandir(mnt / "many") as listing:
        seen = [(e.name, e.is_file(follow_symlinks=False)) for e in listing]
    assert seen == [(f"f{i:04}", True) for i in range(3000)]
    assert sorted(os.listdir(mnt)) == ["big.bin", "broken", "hello.txt", "many", "sub"]


def test_names_and_attributes_are_cached_by_the_kernel_and_so_are_missing_names(
    tiny: tuple[TinyFS, Path],
) -> None:
    fs, mnt = tiny
    for _ in range(3):
        os.stat(mnt / "hello.txt")
        assert not (mnt / "absent").exists()
        (mnt / "hello.txt").read_bytes()
    assert fs.calls["lookup"] == 2  # one each: the positive and the negative entry
    assert fs.calls["getattr"] <= 1
    assert fs.calls["read"] == 1  # pages kept: no open, so nothing tells the kernel otherwise


def test_reads_are_up_to_a_mebibyte(tiny: tuple[TinyFS, Path]) -> None:
    fs, mnt = tiny
    assert set_read_ahead(str(mnt), 1024)
    with open(mnt / "big.bin", "rb", buffering=0) as f:
        assert f.read(len(BIG)) == BIG
    assert max(fs.read_sizes) == 1 << 20


def test_errors_are_replied_and_a_handler_bug_is_an_io_error(tiny: tuple[TinyFS, Path]) -> None:
    fs, mnt = tiny
    with pytest.raises(OSError) as raised:
        (mnt / "broken").read_bytes()
    assert raised.value.errno == errno.EIO
    with pytest.raises(OSError) as missing:
        os.getxattr(mnt / "hello.txt", "user.absent")
    assert missing.value.errno == errno.ENODATA
    assert (mnt / "hello.txt").read_bytes() == b"hello, kernel\n"  # still serving


def test_extended_attributes_and_statfs(tiny: tuple[TinyFS, Path]) -> None:
    fs, mnt = tiny
    assert os.getxattr(mnt / "sub", "user.name") == b"/sub"
    assert os.getxattr(mnt, "user.long") == b"v" * 300  # sized first, then fetched
    assert os.listxattr(mnt / "hello.txt") == ["user.long", "user.name"]
    vfs = os.statvfs(mnt)
    assert (vfs.f_bsize, vfs.f_namemax) == (4096, 255)


def test_the_kernel_forgets_what_it_looked_up_once_caches_are_dropped(
    tiny: tuple[TinyFS, Path],
) -> None:
    fs, mnt = tiny
    for name in os.listdir(mnt / "many")[:500]:
        os.stat(mnt / "many" / name)
    assert sum(fs.lookups.values()) >= 500
    deadline = time.monotonic() + 20
    while sum(fs.lookups.values()) > 0:
        assert time.monotonic() < deadline, f"{sum(fs.lookups.values())} lookups not forgotten"
        drop_caches()
        time.sleep(0.2)


def test_readdirplus_entries_spare_the_lookups(tmp_path: Path) -> None:
    fs = TinyFS()
    for mnt in mount(fs, tmp_path / "mnt", readdirplus=True):
        names = os.listdir(mnt / "many")
        assert len(names) == 3000
        for name in names[:100]:
            os.stat(mnt / "many" / name)
        assert fs.calls["readdirplus"] >= 1
        assert fs.calls["lookup"] <= 2  # /many itself, at most once more
        drop_caches()
        deadline = time.monotonic() + 20
        while sum(fs.lookups.values()) > 0:  # each entry sent counted as a lookup
            assert time.monotonic() < deadline, f"{sum(fs.lookups.values())} not forgotten"
            drop_caches()
            time.sleep(0.2)


def test_nothing_is_left_mounted(tmp_path: Path) -> None:
    fs = TinyFS()
    for mnt in mount(fs, tmp_path / "mnt"):
        assert os.path.ismount(mnt)
    assert not os.path.ismount(tmp_path / "mnt")
    assert shutil.disk_usage(tmp_path).total > 0


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("name", [b".", b"numpy", b"a-name-of-exactly-24-byte", b"x" * 255])
def test_directory_entries_are_packed_byte_for_byte_as_libfuse_packs_them(
    name: bytes, plus: bool
) -> None:
    """READDIR(PLUS) replies are packed in Python, not by a ctypes call per entry: the
    bytes must be libfuse's own (fuse_add_direntry and fuse_add_direntry_plus)."""
    from cvmfs_client import fuse_lowlevel as ll

    attr = ll.Attr(4242, 0o100644, 123_456_789, 3, 1_700_000_000_123_456_789)
    reply = ll.Reply(attr, 86400.0, 1.5)
    session = object.__new__(ll.Session)  # only its packing, no mount
    added: list[bool] = []

    def fs_readdir(ino: int, offset: int, add: ll.AddEntry, plus: bool) -> None:
        added.append(add(name, reply, 7))

    session.fs = type("FS", (), {"readdir": staticmethod(fs_readdir)})()
    replies: list[bytes] = []
    session.lib = _Recording(ll.library(), replies)
    session._list(0, 1, 1024, 0, plus)
    ours = replies[0]
    theirs = ctypes.create_string_buffer(1024)
    if plus:
        entry = ctypes.create_string_buffer(ll.ENTRY_SIZE)
        ll._pack_entry(entry, reply)
        if name in (b".", b".."):  # sent without a nodeid the kernel must count
            ctypes.memset(entry, 0, 8)
        size = ll.library().fuse_add_direntry_plus(None, theirs, 1024, name, entry, 7)
    else:
        stat_buf = ctypes.create_string_buffer(ll.STAT_SIZE)
        ll._STAT.pack_into(stat_buf, 0, *ll._stat_fields(attr))
        size = ll.library().fuse_add_direntry(None, theirs, 1024, name, stat_buf, 7)
    assert added == [True]
    assert ours == theirs.raw[:size]


class _Recording:
    """libfuse, but fuse_reply_buf records the reply instead of sending it."""

    def __init__(self, lib: object, replies: list[bytes]):
        self._lib, self._replies = lib, replies

    def fuse_reply_buf(self, req: int, address: int, size: int) -> int:
        self._replies.append(ctypes.string_at(address, size))
        return 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)
