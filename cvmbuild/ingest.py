"""Turning file content into objects: hash, chunk, compress and store, on every core.

hashlib and zstandard release the GIL on large buffers, so a thread pool keeps all
cores busy without pickling file content between processes. Every file is read once into
memory this process owns, and exactly those bytes are hashed and stored
(cvmbuild/source_file.py says how a file that changes meanwhile is caught).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import zstandard

from cvmbuild.chunking import ChunkPolicy, cut_segments
from cvmbuild.errors import SourceError
from cvmbuild.scan import SourceEntry
from cvmbuild.source_file import (
    ATTEMPTS,
    as_read,
    changed,
    fill_from,
    open_scanned,
    read_snapshot,
    unchanged,
)
from cvmfs_format.catalog import Chunk
from cvmfs_format.objects import encode_object
from cvmfs_format.store import ObjectSink

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

# zstd level 4 stores 1.4% less than 3 on a scientific Python tree for ~20% more
# compression CPU (bench/publish_bench.py); publishing stays well inside its time budget.
DEFAULT_LEVEL = 4
BATCH_FILES = 32
BATCH_BYTES = 4 * 1024 * 1024
# A large file is read this much at a time (plus up to one chunk carried over), and at
# most workers + 2 segments are in memory at once: the old mmap let the bytes hashed
# differ from the bytes stored, and died of SIGBUS when the file was truncated. Reading
# costs a copy mmap did not; 4 MiB segments keep what the workers hash and compress in
# cache (288 MB of chunked files: +9% CPU over mmap, +12% with 8 MiB, more with 16).
SEGMENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileContent:
    """Where a file's content lives: one object, or a list of chunks."""

    hash: str | None
    chunks: tuple[Chunk, ...] = ()


@dataclass
class IngestStats:
    objects_written: int = 0
    stored_bytes: int = 0  # stored bytes of objects written now
    raw_bytes: int = 0  # content bytes of objects written now
    read_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, written: bool, raw: int, stored: int) -> None:
        with self.lock:
            self.read_bytes += raw
            if written:
                self.objects_written += 1
                self.raw_bytes += raw
                self.stored_bytes += stored


class Ingestor:
    def __init__(
        self,
        storage: ObjectSink,
        *,
        level: int = DEFAULT_LEVEL,
        policy: ChunkPolicy | None = None,
        workers: int | None = None,
        progress: Callable[[int], None] | None = None,
    ):
        self.storage = storage
        self.level = level
        self.policy = policy or ChunkPolicy()
        self.workers = workers or os.cpu_count() or 1
        self.progress = progress or (lambda n: None)
        self.stats = IngestStats()
        self._local = threading.local()
        # Digests this publish has taken on: two files with the same new content are
        # compressed and written once, and the summary counts are deterministic.
        self._claimed: set[str] = set()
        self._claim_lock = threading.Lock()
        self._room = threading.BoundedSemaphore(self.workers + 2)
        self._segment_bytes = max(SEGMENT_BYTES, self.policy.max_size)

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "zstd", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.level)
            self._local.zstd = compressor
        return compressor

    def _store_all(self, contents: list[bytes | memoryview]) -> list[str]:
        """Digests of contents, storing those the repository lacks. One question about
        the whole batch: over HTTP, one request instead of one per object."""
        digests = [hashlib.sha256(data).hexdigest() for data in contents]
        first = []
        with self._claim_lock:
            for digest in digests:
                first.append(digest not in self._claimed)
                self._claimed.add(digest)
        absent = self.storage.missing({d for d, f in zip(digests, first, strict=True) if f})
        for data, digest, new in zip(contents, digests, first, strict=True):
            written, stored = False, 0
            if new and digest in absent:
                encoded = encode_object(data, self._compressor())
                written = self.storage.put_object(digest, encoded)
                stored = len(encoded)
            self.stats.add(written, len(data), stored)
            self.progress(len(data))
        return digests

    def _small_files(self, batch: list[SourceEntry]) -> list[tuple[SourceEntry, FileContent]]:
        snapshots = [read_snapshot(entry, self.policy.threshold) for entry in batch]
        digests = self._store_all([data for _, data in snapshots])
        return [(e, FileContent(d)) for (e, _), d in zip(snapshots, digests, strict=True)]

    def _chunks(self, cuts: list[tuple[int, memoryview]]) -> list[Chunk]:
        digests = self._store_all([data for _, data in cuts])
        return [Chunk(o, len(data), d) for (o, data), d in zip(cuts, digests, strict=True)]

    def _large_file(
        self, entry: SourceEntry, pool: ThreadPoolExecutor, cdc: FastCDC
    ) -> tuple[SourceEntry, list[Future[list[Chunk]]]] | None:
        """Read a large file once, in bounded segments handed to the workers as they are
        cut; again if it changed meanwhile. None if it is no longer large."""
        for _ in range(ATTEMPTS):
            futures: list[Future[list[Chunk]]] = []
            covered = 0
            with open_scanned(entry) as (fd, before):
                if before.st_size <= self.policy.threshold:
                    return None
                try:
                    segments = cut_segments(cdc, partial(fill_from, fd), self._segment_bytes)
                    for segment in segments:
                        self._room.acquire()  # bounds the memory of segments in flight
                        future = pool.submit(self._chunks, segment.chunks)
                        future.add_done_callback(lambda _: self._room.release())
                        futures.append(future)
                        covered += sum(len(data) for _, data in segment.chunks)
                except OSError as exc:
                    raise SourceError(f"{entry.abspath}: cannot read ({exc.strerror})") from exc
                after = os.fstat(fd)
            if unchanged(before, after) and covered == before.st_size:
                return as_read(entry, before), futures
            for future in futures:
                future.result()  # what it claimed is stored, or its error is not lost
        raise changed(entry, f"it was written to during each of {ATTEMPTS} reads")

    def ingest(self, entries: Iterable[SourceEntry]) -> dict[str, tuple[SourceEntry, FileContent]]:
        """Content of every given regular file, keyed by relpath, with the entry that
        describes the snapshot read (the scan's, unless the file changed since)."""
        result: dict[str, tuple[SourceEntry, FileContent]] = {}
        chunked: list[tuple[SourceEntry, list[Future[list[Chunk]]]]] = []
        cdc = None
        pool = ThreadPoolExecutor(self.workers)
        try:
            # Small files go to the workers in batches: one future per file cost more
            # in locking than the work itself (profile: 23 futex calls per file).
            small: list[Future[list[tuple[SourceEntry, FileContent]]]] = []
            batch: list[SourceEntry] = []
            batch_bytes = 0
            for entry in entries:
                if entry.size <= self.policy.threshold:
                    batch.append(entry)
                    batch_bytes += entry.size
                    if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                        small.append(pool.submit(self._small_files, batch))
                        batch, batch_bytes = [], 0
                    continue
                if cdc is None:
                    cdc = self.policy.cutter()
                large = self._large_file(entry, pool, cdc)
                if large is not None:
                    chunked.append(large)
                else:
                    small.append(pool.submit(self._small_files, [entry]))
            if batch:
                small.append(pool.submit(self._small_files, batch))
            for future in small:
                for entry, content in future.result():
                    result[entry.relpath] = (entry, content)
            for entry, futures in chunked:
                chunks = tuple(c for f in futures for c in f.result())
                result[entry.relpath] = (entry, FileContent(None, chunks))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed publish stops storing at once
            raise
        pool.shutdown()
        return result
