"""Prefetch bundles on the client: when a file with a `.cvmfsbundle-<name>` beside it is
first looked up, fetch the bundle's members into the cache before they are read.

The FUSE threads only check a set and push work; worker threads read the bundle (a
verified file like any other), resolve its members in the catalogs and fetch their
objects, most recently triggered bundle first and each in access order, through the
mount's fetch worker processes (fetch_pool.py; in this process without them). A
reader never fetches twice what a worker fetches: both go through the cache, which
lets one fetch of an object run at a time, and a member still queued when it is read
is taken off the queue and fetched by the reader.
A member that is missing or fails verification is skipped and logged; reading it then
fails exactly as it would without the bundle.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cvmfs_client.cache import StagedFile, background_thread
from cvmfs_client.content import open_content, pieces
from cvmfs_client.prefetch import CACHE_SHARE
from cvmfs_client.trace import ChunkMap
from cvmfs_format import bundle as bundle_format
from cvmfs_format.catalog import Chunk, Entry
from cvmfs_format.errors import CvmfsError

if TYPE_CHECKING:
    from cvmfs_client.repository import RepositoryReader

log = logging.getLogger(__name__)

WORKERS = 8  # objects in flight: each waits for one of the mount's fetch workers


@dataclass
class BundleStats:
    bundles: int = 0  # bundle files read
    members_fetched: int = 0  # objects a worker fetched into the cache
    members_skipped: int = 0  # members missing, not regular files, or failing to fetch
    hits: int = 0  # member objects a reader found already fetched by a worker


class BundleFetcher:
    """on_lookup and on_read for the FUSE layer (see the module docstring)."""

    def __init__(self, reader: RepositoryReader, workers: int = WORKERS):
        assert reader.cache is not None, "bundles fetch into the cache"
        self.reader = reader
        self.cache = reader.cache
        self.stats = BundleStats()
        self._chunks = ChunkMap(reader)
        # Of the revision served now (the root catalog's hash), forgotten at a switch:
        self._root = ""
        self._seen: set[str] = set()  # paths looked up
        self._members: set[str] = set()  # paths some loaded bundle names
        self._directories: set[str] = set()  # their directories, and the triggers'
        self._objects: set[str] = set()  # their objects
        self._stored: set[str] = set()  # objects a worker fetched
        self._read: set[str] = set()  # member objects already read once
        # (priority, order, work): a bundle path to read, or a Chunk to fetch
        self._heap: list[tuple[tuple[int, int], int, str | Chunk]] = []
        self._queued: set[str] = set()  # objects waiting in the heap
        self._order = itertools.count()
        self._bundles = itertools.count()
        self._cond = threading.Condition()
        self._workers = workers
        self._threads: list[threading.Thread] = []

    # -- the FUSE side: cheap, never blocking on the network -----------------------

    def on_lookup(self, path: str, entry: Entry) -> None:
        if self.reader.root_hash != self._root:
            self._new_revision()
        if path in self._seen:
            return
        self._seen.add(path)
        parent, _, name = path.rpartition("/")
        if bundle_format.is_bundle_name(name):
            return
        bundle_path = f"{parent}/{bundle_format.bundle_name(name)}"
        try:
            found = self.reader.lookup(bundle_path)
        except CvmfsError:  # no bundle here (the parent's listing is in memory)
            return
        if found.is_file:
            self._directories.add(parent or "/")
            self._push([((-next(self._bundles), 0), bundle_path)])

    def _new_revision(self) -> None:
        """What was looked up, loaded and read belongs to the revision it was in: a week
        of switches must not pile it up. Objects already queued are still fetched."""
        with self._cond:
            self._root = self.reader.root_hash
            for known in (self._seen, self._members, self._directories, self._objects,
                          self._stored, self._read):  # fmt: skip
                known.clear()
            self._chunks.clear()

    def covers(self, directory: str) -> bool:
        """Whether a bundle fetches files of directory: then sibling prefetch, which
        would fetch files nobody reads, leaves it alone."""
        return directory in self._directories

    def on_read(self, path: str, entry: Entry, offset: int, size: int) -> None:
        if path not in self._members:
            return
        if entry.chunked:
            try:
                digests = [c.hash for c in self._chunks.covering(entry, offset, size)]
            except CvmfsError:
                return  # the read itself reports it
        else:
            digests = [entry.hash] if entry.hash else []
        for digest in digests:
            if digest not in self._objects or digest in self._read:
                continue
            with self._cond:
                self._read.add(digest)
                if digest in self._stored:
                    self.stats.hits += 1
                # Still queued: the reader fetches it now, and the worker skips it.
                self._queued.discard(digest)

    def statistics(self) -> dict[str, int]:
        return {
            "bundles_read": self.stats.bundles,
            "bundle_members_fetched": self.stats.members_fetched,
            "bundle_members_skipped": self.stats.members_skipped,
            "bundle_hits": self.stats.hits,
        }

    # -- the queue -----------------------------------------------------------------

    def _push(self, items: list[tuple[tuple[int, int], str | Chunk]]) -> None:
        with self._cond:
            if not self._threads:
                self._start()
            for priority, work in items:
                if isinstance(work, Chunk):
                    if work.hash in self._queued:
                        continue
                    self._queued.add(work.hash)
                heapq.heappush(self._heap, (priority, next(self._order), work))
            self._cond.notify(len(items))

    def _start(self) -> None:
        self._threads = [
            threading.Thread(target=self._work, name=f"bundle_{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def _next(self) -> str | Chunk:
        with self._cond:
            while True:
                while not self._heap:
                    self._cond.wait()
                _, _, work = heapq.heappop(self._heap)
                if isinstance(work, str):
                    return work
                if work.hash in self._queued:  # else a reader took it
                    self._queued.discard(work.hash)
                    return work

    def _work(self) -> None:
        background_thread()
        while True:
            work = self._next()
            try:
                if isinstance(work, str):
                    self._read_bundle(work)
                else:
                    self._fetch(work)
            except Exception:  # a full disk, no fds left...: the worker must go on
                log.exception("bundle work on %s failed", work)

    # -- the workers' side ---------------------------------------------------------

    def _read_bundle(self, bundle_path: str) -> None:
        reader = self.reader
        try:
            entry = reader.lookup(bundle_path)
            if entry.size > bundle_format.MAX_BUNDLE_SIZE:
                raise CvmfsError(f"larger than {bundle_format.MAX_BUNDLE_SIZE} bytes")
            with open_content(reader, entry) as content:
                data = b"".join(pieces(content))
            bundle = bundle_format.decode(data, bundle_path)
        except CvmfsError as exc:
            log.warning("bundle %s ignored: %s", bundle_path, exc)
            return
        with self._cond:
            self.stats.bundles += 1
            rank = -next(self._bundles)
        log.info("bundle %s: %d members", bundle_path, len(bundle.members))
        for index, member in enumerate(bundle.members):
            objects = self._objects_of(member, bundle.ranges.get(member), bundle_path)
            with self._cond:
                self._members.add(member)
                self._directories.add(member.rpartition("/")[0] or "/")
                self._objects.update(c.hash for c in objects)
            # Pushed member by member: the first ones start while later ones resolve.
            self._push([((rank, index), c) for c in objects if c.hash not in self.cache])

    def _objects_of(
        self, member: str, ranges: list[tuple[int, int]] | None, bundle_path: str
    ) -> list[Chunk]:
        """The objects of member to fetch: the whole file, or for a chunked one the
        chunks covering the bundle's ranges (all chunks when it gives none)."""
        try:
            entry = self.reader.lookup(member)
            if not entry.is_file:
                raise CvmfsError("not a regular file")
            if not entry.chunked:
                assert entry.hash is not None
                return [Chunk(0, entry.size, entry.hash)]
            if ranges is None:
                return self.reader.chunks(entry)
            picked: dict[str, Chunk] = {}
            for start, end in ranges:
                for chunk in self._chunks.covering(entry, start, end - start):
                    picked.setdefault(chunk.hash, chunk)
            return list(picked.values())
        except CvmfsError as exc:
            with self._cond:
                self.stats.members_skipped += 1
            log.warning("bundle %s: member %s skipped: %s", bundle_path, member, exc)
            return []

    def _fetch(self, chunk: Chunk) -> None:
        cache = self.cache
        if cache.quota is not None and cache.used + chunk.size > cache.quota * CACHE_SHARE:
            with self._cond:
                self.stats.members_skipped += 1
            return  # the cache is nearly full: no speculative work
        fetched = False

        def fetch() -> bytes | StagedFile:
            nonlocal fetched
            fetched = True
            return self.reader.fetch_content(chunk.hash, chunk.size)

        try:
            self.cache.release(chunk.hash, self.cache.acquire(chunk.hash, fetch, chunk.size))
        except CvmfsError as exc:  # a read of the member reports it as EIO
            with self._cond:
                self.stats.members_skipped += 1
            log.warning("bundle member object %s skipped: %s", chunk.hash, exc)
            return
        with self._cond:
            if fetched:
                self.stats.members_fetched += 1
                self._stored.add(chunk.hash)
