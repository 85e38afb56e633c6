"""Writing a cpio archive in the "newc" format the kernel unpacks as its initramfs.

Pure: entries in, bytes out; every timestamp and owner is fixed, so the same entries
give the same archive.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class CpioEntry:
    path: str  # relative, without a leading '/'
    mode: int  # full st_mode: type and permission bits
    data: bytes = b""  # file content, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # for device nodes


def directory(path: str) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | mode, data)


def symlink(path: str, target: str) -> CpioEntry:
    return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, mode: int = 0o600) -> CpioEntry:
    return CpioEntry(path, stat.S_IFCHR | mode, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(ino: int, entry: CpioEntry, mtime: int) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, mtime, len(entry.data),
        0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
    )  # fmt: skip
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out = header + name
    out += _pad(len(out))
    return out + entry.data + _pad(len(entry.data))


def archive(entries: list[CpioEntry], mtime: int = 0) -> bytes:
    """A newc archive of entries, parents before children, ending in the TRAILER!!!."""
    parts = [_record(i, e, mtime) for i, e in enumerate(sorted(entries, key=lambda e: e.path), 1)]
    parts.append(_record(0, CpioEntry("TRAILER!!!", 0), 0))
    return b"".join(parts)
