"""libfuse through mfusepy, with the fast paths a read-only file system can take.

mfusepy turns every call into Python values (attribute dicts, bytes) and back. The
bridge hands libfuse packed `struct stat`s and reads file content straight into
libfuse's buffer; a directory is listed in one call, whose entries carry only their
type (d_type), and libfuse answers the kernel's further READDIR pages itself.

READDIRPLUS (libfuse 3) was measured and not kept: it needs offset-mode listings, so
every page of a directory is a call into Python, and a page holds a sixth as many
entries; a cold `find` of the benchmark tree took 0.36-0.52 s against 0.31-0.34 s.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Protocol

import mfusepy

FuseOSError = mfusepy.FuseOSError
Operations = mfusepy.Operations
ENOATTR = mfusepy.ENOATTR
c_stat = mfusepy.c_stat
LIBFUSE_MAJOR = mfusepy.fuse_version_major

STAT_SIZE = ctypes.sizeof(mfusepy.c_stat)


def _stat_layout() -> tuple[struct.Struct, list[str]]:
    """A struct format for the fields of mfusepy's `struct stat` that we set, at their
    offsets on this platform; every other byte is zero."""
    settable = {"st_nlink", "st_mode", "st_size", "st_blocks"}
    times = {"st_atimespec", "st_mtimespec", "st_ctimespec"}
    fmt, position, names = "=", 0, []
    fields = sorted(mfusepy.c_stat._fields_, key=lambda f: getattr(mfusepy.c_stat, f[0]).offset)
    for name, *_ in fields:
        field = getattr(mfusepy.c_stat, name)
        fmt += f"{field.offset - position}x" if field.offset > position else ""
        if name in settable:
            fmt += {4: "I", 8: "Q"}[field.size]
            names.append(name)
        elif name in times:
            fmt += {16: "qq", 8: "ii"}[field.size]
            names += ["seconds", "nanoseconds"]
        else:
            fmt += f"{field.size}x"
        position = field.offset + field.size
    fmt += f"{STAT_SIZE - position}x" if STAT_SIZE > position else ""
    return struct.Struct(fmt), names


_STAT, _STAT_FIELDS = _stat_layout()


def packed_stat(mode: int, size: int, nlink: int, mtime_ns: int) -> mfusepy.c_stat:
    """A `struct stat` of a read-only entry owned by root (one struct.pack: a fifth of
    the cost of setting ctypes fields one by one)."""
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    values = {
        "st_mode": mode,
        "st_size": size,
        "st_nlink": nlink,
        "st_blocks": (size + 511) // 512,
        "seconds": seconds,
        "nanoseconds": nanoseconds,
    }
    return mfusepy.c_stat.from_buffer_copy(_STAT.pack(*(values[n] for n in _STAT_FIELDS)))


class ReadOnlyTree(Protocol):
    """What the bridge calls; cvmfs_client.fuse_ops.RepositoryFS implements it."""

    def getattr(self, path: str, fh: int | None = None) -> mfusepy.c_stat: ...

    def readdir(self, path: str, fh: int) -> list[tuple[bytes, mfusepy.c_stat]]: ...

    def open(self, path: str, flags: int) -> tuple[int, bool, bool]:
        """(file handle, whether the kernel may keep the file's cached pages, whether
        reads must bypass the page cache)"""
        ...

    def read(self, buffer: memoryview, offset: int, fh: int) -> int: ...


class Bridge(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy.FUSE with the calls of a read-only tree that dominate a cold start
    replaced by versions that skip mfusepy's conversions."""

    operations: ReadOnlyTree

    def _decode(self, path: bytes | None) -> str:
        # As mfusepy decodes: a name that is not UTF-8 is then simply not found.
        return "/" if path is None else path.decode(self.encoding, self.errors)

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        st = self.operations.getattr(self._decode(path))
        ctypes.memmove(buf, ctypes.addressof(st), STAT_SIZE)
        return 0

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        buffer = (ctypes.c_char * size).from_address(ctypes.cast(buf, ctypes.c_void_p).value or 0)
        return int(self.operations.read(memoryview(buffer).cast("B"), offset, fip.contents.fh))

    def _fill(self, path: bytes | None, buf: Any, filler: Any) -> int:
        # Offset 0 for every entry: libfuse keeps the whole listing and serves the
        # kernel's later pages of it without calling up into Python.
        flags = () if LIBFUSE_MAJOR == 2 else (0,)  # libfuse 3's filler takes flags too
        for name, st in self.operations.readdir(self._decode(path), 0):
            if filler(buf, name, st, 0, *flags):
                break
        return 0

    def readdir_fuse_2(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any
    ) -> int:
        return self._fill(path, buf, filler)

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        return self._fill(path, buf, filler)

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh, fi.keep_cache, fi.direct_io = self.operations.open(self._decode(path), fi.flags)
        if hasattr(fi, "noflush"):
            fi.noflush = 1  # nothing to flush on close: spare the kernel a round trip
        return 0
