"""`mount --trace FILE`: the first access of each file and chunk, in order, for
`cvmbuild bundle` to turn into prefetch bundles (docs/FORMAT.md, "Access traces").

The FUSE threads only append to a list; a thread of its own writes it out every few
seconds, and close() writes the rest at unmount.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from cvmfs_format.catalog import Chunk, Entry
from cvmfs_format.errors import CvmfsError, FormatError

if TYPE_CHECKING:
    from cvmfs_client.repository import RepositoryReader

log = logging.getLogger(__name__)

FORMAT = "cvmfs-py-trace"
VERSION = 1
FLUSH_S = 3.0
KINDS = ("lookup", "read", "chunk")


@dataclass(frozen=True)
class TraceEvent:
    seconds: float  # since the mount started
    kind: str  # lookup: a file was looked up; read: its content read; chunk: one chunk read
    path: str
    object: str | None  # content hash (read), chunk hash (chunk); None for a chunked lookup
    offset: int = 0  # of the chunk in the file
    size: int = 0  # of the object's content


class ChunkMap:
    """The chunks of chunked files, looked up once per file and revision."""

    def __init__(self, reader: RepositoryReader):
        self.reader = reader
        self._known: dict[Entry, tuple[list[int], list[Chunk]]] = {}

    def clear(self) -> None:
        self._known.clear()

    def covering(self, entry: Entry, offset: int, size: int) -> list[Chunk]:
        known = self._known.get(entry)
        if known is None:
            chunks = self.reader.chunks(entry)
            known = self._known.setdefault(entry, ([c.offset for c in chunks], chunks))
        offsets, chunks = known
        first = max(bisect.bisect_right(offsets, offset) - 1, 0)
        end = offset + max(size, 1)
        return [c for c in chunks[first:] if c.offset < end]


class Tracer:
    """on_lookup and on_read for the FUSE layer, recording first accesses to out."""

    def __init__(self, reader: RepositoryReader, out: TextIO):
        self.out = out
        self._chunks = ChunkMap(reader)
        self._seen: set[tuple[str, str | None, str]] = set()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._closed = threading.Event()
        manifest = reader.manifest
        header = {
            "format": FORMAT,
            "version": VERSION,
            "repository": manifest.name if manifest else "",
            "revision": manifest.revision if manifest else 0,
            "started": round(time.time(), 3),
        }
        self._pending.append(json.dumps(header))
        self._flusher = threading.Thread(target=self._flush_often, name="trace", daemon=True)
        self._flusher.start()

    def _record(self, kind: str, path: str, digest: str | None, offset: int, size: int) -> None:
        key = (kind, digest, path)
        if key in self._seen:
            return
        event = {
            "t": round(time.monotonic() - self._start, 6),
            "kind": kind,
            "path": path,
            "object": digest,
        }
        if kind == "chunk":
            event["offset"] = offset
        event["size"] = size
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self._pending.append(json.dumps(event, ensure_ascii=False))

    def on_lookup(self, path: str, entry: Entry) -> None:
        self._record("lookup", path, entry.hash, 0, entry.size)

    def on_read(self, path: str, entry: Entry, offset: int, size: int) -> None:
        if not entry.chunked:
            self._record("read", path, entry.hash, 0, entry.size)
            return
        try:
            chunks = self._chunks.covering(entry, offset, size)
        except CvmfsError as exc:  # the read itself reports it
            log.info("trace: chunks of %s: %s", path, exc)
            return
        for chunk in chunks:
            self._record("chunk", path, chunk.hash, chunk.offset, chunk.size)

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()

    def _flush_often(self) -> None:
        while not self._closed.wait(FLUSH_S):
            try:
                self.flush()
            except OSError as exc:
                log.error("trace: writing %s failed: %s", self.out.name, exc)

    def close(self) -> None:
        self._closed.set()
        self._flusher.join()
        self.flush()
        self.out.close()


def read_trace(lines: Iterator[str], where: str) -> Iterator[list[TraceEvent]]:
    """The sessions of a trace file (one per mount that appended to it), in order."""
    session: list[TraceEvent] | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("format") == FORMAT:
                if record.get("version") != VERSION:
                    raise FormatError(f"trace version {record.get('version')} unknown")
                if session:
                    yield session
                session = []
                continue
            if session is None:
                raise FormatError("no header line before the first event")
            if record["kind"] not in KINDS:
                raise FormatError(f"unknown kind {record['kind']!r}")
            session.append(
                TraceEvent(
                    float(record["t"]),
                    record["kind"],
                    str(record["path"]),
                    record["object"],
                    int(record.get("offset", 0)),
                    int(record.get("size", 0)),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError, FormatError) as exc:
            raise FormatError(f"{where}, line {number}: not a trace record ({exc})") from None
    if session:
        yield session
