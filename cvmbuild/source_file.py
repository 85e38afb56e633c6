"""Reading a scanned file: opened once, never through a link, never blocking, checked to
be the regular file the scan saw, and its bytes taken as one snapshot or not at all.

A file a build still writes (or someone swaps) while it is published must not end up
as a mix of two versions, nor as another file's bytes: every read is bracketed by two
fstat calls, and a read that saw the file change is done again or refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterator

from cvmbuild.errors import SourceChanged, SourceError
from cvmbuild.scan import SourceEntry, kind_name, open_as_scanned

# O_NOFOLLOW: a file swapped for a symlink is not followed (the run published a
# root-only file so); O_NONBLOCK: a file swapped for a fifo does not hang the publish
# while it holds the repository lock.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
ATTEMPTS = 3  # reads of a file that keeps changing before the publish gives up


def changed(entry: SourceEntry, how: str) -> SourceError:
    return SourceChanged(entry.abspath, how)


@contextlib.contextmanager
def open_scanned(entry: SourceEntry) -> Iterator[tuple[int, os.stat_result]]:
    """The file the scan saw at entry.abspath, open for reading, with its fstat."""
    fd = open_as_scanned(
        entry.abspath, OPEN_FLAGS, "it, or a directory above it, is now a link or a socket", "file"
    )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise changed(entry, f"it is now a {kind_name(st.st_mode)}")
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
            # Also what a parent directory swapped for a symlink looks like.
            raise changed(entry, "another file took its place")
        yield fd, st
    finally:
        os.close(fd)


def unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether nothing wrote to the file between two fstat calls on it."""
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


def as_read(entry: SourceEntry, st: os.stat_result) -> SourceEntry:
    """The entry with the metadata of the snapshot that was read (a file may change
    between the scan and its read; the catalog must describe the bytes stored)."""
    fresh = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_nlink)
    if fresh == (entry.size, entry.mtime_ns, entry.ctime_ns, entry.mode, entry.nlink):
        return entry
    return dataclasses.replace(
        entry,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        mode=st.st_mode,
        nlink=st.st_nlink,
    )


def fill_from(fd: int, view: memoryview) -> int:
    """Read into view until it is full or the file ends; the bytes read."""
    done = 0
    while done < len(view):
        n = os.readv(fd, [view[done:]])
        if n == 0:
            break
        done += n
    return done


def read_whole(fd: int, size: int) -> bytes:
    """The file's content, expected to be size bytes: one read asks for one byte more, so
    a file that grew is seen without another call (the caller compares the length)."""
    data = os.read(fd, size + 1)
    while 0 < len(data) <= size:
        more = os.read(fd, size + 1 - len(data))
        if not more:
            break
        data += more
    return data


def read_snapshot(entry: SourceEntry, limit: int) -> tuple[SourceEntry, bytes]:
    """The whole content of a file of at most limit bytes, as one snapshot, with the
    entry describing it."""
    for _ in range(ATTEMPTS):
        with open_scanned(entry) as (fd, before):
            if before.st_size > limit:
                raise changed(entry, f"it grew from {entry.size} to {before.st_size} bytes")
            try:
                data = read_whole(fd, before.st_size)
            except OSError as exc:
                raise SourceError(f"{entry.abspath}: cannot read ({exc.strerror})") from exc
            after = os.fstat(fd)
        if unchanged(before, after) and len(data) == before.st_size:
            return as_read(entry, before), data
    raise changed(entry, f"it was written to during each of {ATTEMPTS} reads")
