"""Reading a regular file's verified content: the one reader behind the mount, `cat` and
`preload`, and the one place that checks a chunked file's chunk list covers it.

open_content(reader, entry) gives a handle with readinto(buffer, offset); a file stored
as one object is read through a pinned fd on its cache entry, a chunked one chunk by
chunk, each pinned only while it is read.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Self

from cvmfs_format.catalog import Chunk, Entry, check_chunk_list
from cvmfs_format.errors import NotFoundError, VerificationError

if TYPE_CHECKING:
    from cvmfs_client.repository import RepositoryReader

AHEAD_CHUNKS = 4  # chunks fetched ahead of a sequential reader
PIECE = 1 << 20  # what pieces() reads of a file stored as one object at a time

Ahead = Callable[[list[Chunk]], None]  # fetches chunks in the background


def open_content(reader: RepositoryReader, entry: Entry, ahead: Ahead | None = None) -> Content:
    """The content of a regular file. A file stored as one object is fetched now; a
    chunked one is checked (its chunks must tile it) and fetched as it is read, the next
    AHEAD_CHUNKS handed to ahead when it is read sequentially."""
    if not entry.is_file:
        raise NotFoundError(f"{entry.path}: not a regular file")
    if not entry.chunked:
        assert entry.hash is not None
        return WholeObject(reader, entry, reader.open_object(entry.hash, entry.size))
    chunks = reader.chunks(entry)
    check_chunk_list(entry.path, entry.size, chunks)
    return ChunkedObject(reader, entry, chunks, ahead)


def warm(reader: RepositoryReader, chunk: Chunk) -> None:
    """Fetch one object (a chunk, or a whole file as Chunk(0, size, hash)) into the cache."""
    reader.close_object(chunk.hash, reader.open_object(chunk.hash, chunk.size))


def pieces(content: Content) -> Iterator[bytes]:
    """The whole content in order, a chunk (or a PIECE) at a time: what `cat` writes."""
    size = content.entry.size
    spans = [(c.offset, c.size) for c in content.chunks] or [
        (offset, min(PIECE, size - offset)) for offset in range(0, size, PIECE)
    ]
    for offset, length in spans:
        buffer = bytearray(length)
        if content.readinto(memoryview(buffer), offset) != length:
            raise VerificationError(f"{content.entry.path}: content ends before byte {size}")
        yield bytes(buffer)


class Content:
    """An open file's content; close() unpins what it holds."""

    entry: Entry
    chunks: list[Chunk]  # empty for a file stored as one object

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Read up to len(buffer) bytes at offset; fewer only at the end of the file."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _short(self, offset: int) -> VerificationError:
        # A verified entry changed under an fd already open: the trade-off of checking
        # entries when they are opened, not on every read. Never a short read.
        return VerificationError(f"{self.entry.path}: cache entry changed while open, at {offset}")


class WholeObject(Content):
    def __init__(self, reader: RepositoryReader, entry: Entry, fd: int):
        self.reader, self.entry, self.fd = reader, entry, fd
        self.chunks = []
        self.size = entry.size

    def readinto(self, buffer: memoryview, offset: int) -> int:
        done = os.preadv(self.fd, [buffer], offset)
        if done < len(buffer) and offset + done < self.size:
            raise self._short(offset + done)
        return done

    def close(self) -> None:
        assert self.entry.hash is not None
        self.reader.close_object(self.entry.hash, self.fd)


class ChunkedObject(Content):
    def __init__(
        self, reader: RepositoryReader, entry: Entry, chunks: list[Chunk], ahead: Ahead | None
    ):
        self.reader, self.entry, self.chunks = reader, entry, chunks
        self.offsets = [c.offset for c in chunks]  # for bisect
        self.ahead = ahead
        self.next_offset = 0  # where a sequential reader reads next
        self.handed = 0  # chunks below this index were already handed to ahead

    def readinto(self, buffer: memoryview, offset: int) -> int:
        end = min(offset + len(buffer), self.entry.size)
        first = max(bisect.bisect_right(self.offsets, offset) - 1, 0)
        if self.ahead is not None and offset == self.next_offset:
            self._fetch_ahead(first + 1)
        self.next_offset = end
        done = 0
        for chunk in self.chunks[first:]:
            if chunk.offset >= end:
                break
            chunk_end = chunk.offset + chunk.size
            if chunk_end <= offset:
                continue
            start = max(offset, chunk.offset)
            want = min(end, chunk_end) - start
            fd = self.reader.open_object(chunk.hash, chunk.size)
            try:
                got = os.preadv(fd, [buffer[done : done + want]], start - chunk.offset)
            finally:
                self.reader.close_object(chunk.hash, fd)
            if got != want:
                raise self._short(start + got)
            done += got
        return done

    def _fetch_ahead(self, index: int) -> None:
        """A sequential reader will want the next chunks: fetch them in parallel now."""
        assert self.ahead is not None
        stop = min(index + AHEAD_CHUNKS, len(self.chunks))
        start = max(index, self.handed)
        self.handed = max(self.handed, stop)
        if start < stop:
            self.ahead(self.chunks[start:stop])

    def close(self) -> None:
        pass
