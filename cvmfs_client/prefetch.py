"""Fetching ahead of readers: the next chunks of a sequential read, and the other files
of a directory whose first file was opened, by a few background workers.

Work is taken by priority, not in arrival order: the chunks a reader is about to reach
first, then the most recently entered directory (programs walk trees depth first, an
import goes into a subpackage and comes back), and within a directory the files like
the one just opened (same suffix) before the rest, smaller before larger.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

from cvmfs_client.cache import background_thread
from cvmfs_format.catalog import Chunk, Entry
from cvmfs_format.errors import CvmfsError

log = logging.getLogger(__name__)

SIBLING_MAX = 4 << 20  # larger files are chunked and fetched as they are read
CACHE_SHARE = 0.8  # never prefetch into the last fifth of the cache quota
WORKERS = 4

URGENT = 0  # chunks of a file being read
SIBLING = 1


def _suffix(name: str) -> str:
    return name.rpartition(".")[2] if "." in name else ""


class Prefetcher:
    """A priority queue of objects to fetch, and the worker threads that fetch them.

    `warm(chunk)` fetches one object into the cache; `room(size)` says whether the cache
    may take that many more bytes of speculative content.
    """

    def __init__(
        self,
        warm: Callable[[Chunk], None],
        room: Callable[[int], bool],
        workers: int = WORKERS,
    ):
        self._warm = warm
        self._room = room
        self._heap: list[tuple[tuple[int, ...], int, Chunk]] = []
        self._queued: dict[str, tuple[int, ...]] = {}  # hash -> best priority waiting
        self._taken: set[str] = set()  # being fetched
        self._order = itertools.count()
        self._directories = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"prefetch_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def chunks(self, chunks: list[Chunk]) -> None:
        """A sequential reader will want these next, in this order."""
        self._push([((URGENT,), c) for c in chunks])

    def siblings(
        self, opened: Entry, children: list[Entry], is_cached: Callable[[str], bool]
    ) -> None:
        """`opened` was just opened: fetch the other unchunked files of its directory."""
        depth = -next(self._directories)  # newest directory first
        suffix = _suffix(opened.name)
        items: list[tuple[tuple[int, ...], Chunk]] = []
        for child in children:
            if (
                not child.is_file
                or child.chunked
                or child.hash is None
                or child.size > SIBLING_MAX
                or child.path == opened.path
                or is_cached(child.hash)
            ):
                continue
            alike = 0 if _suffix(child.name) == suffix else 1
            items.append(((SIBLING, depth, alike, child.size), Chunk(0, child.size, child.hash)))
        self._push(items)

    def _push(self, items: list[tuple[tuple[int, ...], Chunk]]) -> None:
        with self._cond:
            for priority, chunk in items:
                queued = self._queued.get(chunk.hash)
                if chunk.hash in self._taken or (queued is not None and queued <= priority):
                    continue
                # Queued at a lower priority (a sibling a reader now reaches): the
                # better entry goes in beside it, and the other is skipped when popped.
                self._queued[chunk.hash] = priority
                heapq.heappush(self._heap, (priority, next(self._order), chunk))
            self._cond.notify(len(items))

    def _next(self) -> Chunk | None:
        """The most urgent object to fetch; None once closed."""
        with self._cond:
            while True:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                priority, _, chunk = heapq.heappop(self._heap)
                if self._queued.get(chunk.hash) != priority:
                    continue  # superseded by the same object at a better priority
                if priority[0] != SIBLING or self._room(chunk.size):
                    del self._queued[chunk.hash]
                    self._taken.add(chunk.hash)
                    return chunk
                # The cache is nearly full: drop the speculative work, keep urgent chunks.
                self._heap = [item for item in self._heap if item[0][0] != SIBLING]
                heapq.heapify(self._heap)
                self._queued = {}
                for kept, _, c in self._heap:
                    self._queued[c.hash] = min(kept, self._queued.get(c.hash, kept))

    def _work(self) -> None:
        background_thread()
        while (chunk := self._next()) is not None:
            try:
                self._warm(chunk)
            except CvmfsError as exc:  # the read itself will report it as EIO
                log.info("prefetch of %s failed: %s", chunk.hash, exc)
            except Exception:  # a full disk, no fds left...: the worker must go on
                log.exception("prefetch of %s failed", chunk.hash)
            finally:
                with self._cond:
                    self._taken.discard(chunk.hash)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
