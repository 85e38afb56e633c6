"""What the kernel may still hold of a path across revision switches, and so what each
open must tell it: keep the cached pages, or read past them (direct I/O).

High-level FUSE gives a path one inode, so one page cache and one size, shared by every
revision of it. After a switch the kernel may hold another revision's pages, and until
its attribute timeout another revision's size, at which it cuts page-cache reads.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import TypeVar

REMEMBERED = 65536  # paths whose last told size and last opened content are kept

V = TypeVar("V")


def _remember(memo: OrderedDict[str, V], key: str, value: V) -> V | None:
    """Store value under key, newest last, at most REMEMBERED keys; returns the old value.
    A key dropped here costs only a cautious answer, never a wrong one."""
    old = memo.pop(key, None)
    memo[key] = value
    if len(memo) > REMEMBERED:
        memo.popitem(last=False)
    return old


class KernelView:
    """Per path: the content last opened through the page cache, the size last told,
    the (content, size) of the handles open now, and until when the kernel's size is
    unsure. `now` is time.monotonic() of the caller; every method is thread-safe."""

    def __init__(self, attr_timeout: float):
        self.attr_timeout = attr_timeout
        self._lock = threading.Lock()
        self._contents: OrderedDict[str, str] = OrderedDict()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._open: dict[str, Counter[tuple[str, int]]] = {}
        self._unsure: dict[str, float] = {}
        self._switched_at = -attr_timeout

    def switched(self, now: float) -> None:
        """A new revision is served from now on."""
        with self._lock:
            self._switched_at = now

    def size_to_tell(self, path: str, size: int) -> int:
        """The size to report for path: while handles on other revisions of it are
        open, the largest of theirs and this one, so that none is cut short."""
        with self._lock:
            told = max([size, *(s for _, s in self._open.get(path, ()))])
            _remember(self._sizes, path, told)
            return told

    def opening(self, path: str, content: str, size: int, now: float) -> tuple[bool, bool]:
        """(keep_cache, direct_io) for a new handle on content of path, now registered.

        The pages are kept only if the path had this content when last opened through
        the page cache (libfuse's auto_cache compares size and mtime only). Reads go
        past the page cache while a handle on another content of the path is open,
        where the size last told differs from this one, and, for an attribute timeout,
        where that size was forgotten after a switch or where a handle opened before a
        switch was just closed (its short reads may have cut the kernel's size).
        """
        with self._lock:
            if self._unsure.get(path, now) < now:
                del self._unsure[path]
            told = self._sizes.get(path)
            handles = self._open.setdefault(path, Counter())
            direct = (
                any(other != content for other, _ in handles)
                or (told is not None and told != size)
                or (told is None and now < self._switched_at + self.attr_timeout)
                or path in self._unsure
            )
            handles[content, size] += 1
            if direct:
                self._contents.pop(path, None)
                return False, True
            return _remember(self._contents, path, content) == content, False

    def closed(self, path: str, content: str, size: int, before_switch: bool, now: float) -> None:
        """A handle from opening() is released; before_switch: it was opened at an
        older revision than the one served now."""
        with self._lock:
            if before_switch:
                self._unsure[path] = now + self.attr_timeout
            handles = self._open[path]
            handles[content, size] -= 1
            if handles[content, size] <= 0:
                del handles[content, size]
            if not handles:
                del self._open[path]
