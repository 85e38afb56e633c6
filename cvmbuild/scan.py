"""Walking a build tree into a list of entries, refusing what cannot be published."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from cvmbuild.errors import SourceChanged, SourceError

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class SourceEntry:
    relpath: str  # "" for the tree's top directory, "a/b" below it
    abspath: str
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    nlink: int
    target: str | None  # symlink target, never followed

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def kind_name(mode: int) -> str:
    """What a file that is not a regular file is, for messages."""
    return {
        stat.S_IFDIR: "directory",
        stat.S_IFLNK: "symbolic link",
        stat.S_IFSOCK: "socket",
        stat.S_IFIFO: "fifo",
        stat.S_IFCHR: "character device",
        stat.S_IFBLK: "block device",
    }.get(stat.S_IFMT(mode), "special file")


def _check_utf8(text: str, path: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SourceError(
            f"{os.fsencode(path)!r}: {what} is not valid UTF-8; rename it to publish"
        ) from exc


def _entry(relpath: str, abspath: str, st: os.stat_result) -> SourceEntry:
    target = None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(abspath)
        _check_utf8(target, abspath, "symlink target")
    return SourceEntry(
        relpath,
        abspath,
        st.st_mode,
        st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        target,
    )


def scan(
    src: str, *, skip_special: bool = False, warn: Callable[[str], None] = print
) -> list[SourceEntry]:
    """Entries of the tree under src, parents before children, names sorted.

    Sockets, devices and fifos are an error (or skipped with a warning when
    skip_special is set); so is a name that is not valid UTF-8 or a directory that
    cannot be read: nothing is ever lost silently.
    """
    try:
        top = os.lstat(src)
    except OSError as exc:
        raise SourceError(f"{src}: {exc.strerror}") from exc
    if not stat.S_ISDIR(top.st_mode):
        raise SourceError(f"{src}: not a directory")
    result = [_entry("", src, top)]
    stack = [("", src, top)]
    while stack:
        rel, path, seen = stack.pop()
        subdirs = []
        parent = path if path.endswith("/") else f"{path}/"  # os.path.join, once a directory
        for name, st in _list_directory(path, seen):
            child_path = parent + name
            _check_utf8(name, child_path, "name")
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                what = kind_name(st.st_mode)
                if skip_special:
                    warn(f"warning: skipping {what} {child_path}")
                    continue
                raise SourceError(
                    f"{child_path}: is a {what}, which a repository cannot hold "
                    "(remove it or pass --skip-special)"
                )
            child_rel = f"{rel}/{name}" if rel else name
            entry = _entry(child_rel, child_path, st)
            result.append(entry)
            if entry.is_dir:
                subdirs.append((child_rel, child_path, st))
        stack.extend(reversed(subdirs))
    return result


def open_as_scanned(path: str, flags: int, swapped: str, what: str) -> int:
    """An fd on what the scan saw at path, opened with flags (which never follow a link
    nor block); what happened to it in the meantime as SourceChanged (swapped: how a
    link or a thing of another kind in its place reads)."""
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise SourceChanged(path, swapped) from exc
        if exc.errno == errno.ENOENT:
            raise SourceChanged(path, "it was removed") from exc
        raise SourceError(f"{path}: cannot read {what} ({exc.strerror})") from exc


def _list_directory(path: str, seen: os.stat_result) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of each entry of the directory the scan saw at path, sorted by name.

    Opened without following a link and checked to be that directory: one swapped for a
    symlink to a directory outside the tree after its parent was listed is not entered.
    """
    fd = open_as_scanned(path, DIRECTORY_FLAGS, "it is no longer a directory", "directory")
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
            raise SourceChanged(path, "another directory took its place")
        with os.scandir(fd) as it:
            # stat() works relative to fd, so it must happen while fd is open.
            return sorted(((e.name, e.stat(follow_symlinks=False)) for e in it), key=_by_name)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read directory ({exc.strerror})") from exc
    finally:
        os.close(fd)


def _by_name(item: tuple[str, os.stat_result]) -> str:
    return item[0]
