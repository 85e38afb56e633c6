"""The FUSE operations: kernel calls translated into calls on a RepositoryReader.

Read-only; every byte served comes from a verified cache file. A failure to fetch or
verify an object is EIO for that file only, logged with the object and the mirror.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from cvmfs_client.content import Content, open_content, warm
from cvmfs_client.fuse_bridge import ENOATTR, FuseOSError, Operations, c_stat, packed_stat
from cvmfs_client.page_cache import KernelView
from cvmfs_client.prefetch import CACHE_SHARE, Prefetcher
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.catalog import Chunk, Entry
from cvmfs_format.errors import CvmfsError, FormatError, NotFoundError

log = logging.getLogger(__name__)

ROOT_XATTRS = ["user.revision", "user.host", "user.proxy", "user.root_hash", "user.stats"]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


_thread = threading.local()
Op = TypeVar("Op", bound=Callable[..., Any])
# Called after each lookup of a regular file, and before each read (path, entry,
# offset, size): the access tracer and the bundle fetcher (cvmfs_client.trace, .bundles).
OnLookup = Callable[[str, Entry], None]
OnRead = Callable[[str, Entry, int, int], None]


def on_fuse_thread(op: Op) -> Op:
    """libfuse calls in from its own worker threads, and ctypes gives each call a fresh
    Python thread state that it destroys on return: an mmap, a munmap and a gettid per
    request, measured at a fifth of a warm request's cost. One PyGILState_Ensure that is
    never released keeps each worker's state for the life of the thread."""

    @functools.wraps(op)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not getattr(_thread, "kept", False):
            ctypes.pythonapi.PyGILState_Ensure()
            _thread.kept = True
        return op(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class OpenFile:
    content: Content
    readinto: Callable[[memoryview, int], int]  # content.readinto, looked up once
    identity: str  # its content's identity, for KernelView
    root: str  # root catalog of the revision it was opened at


class Opened(NamedTuple):
    fh: int
    keep_cache: bool  # the kernel's cached pages of the file hold this content
    direct_io: bool  # the kernel's idea of the file's size may be another revision's


class RepositoryFS(Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(
        self,
        reader: RepositoryReader,
        on_ready: Any = None,
        *,
        prefetch_siblings: bool = True,
        attr_timeout: float = 60.0,
        on_lookup: OnLookup | None = None,
        on_read: OnRead | None = None,
        more_statistics: Callable[[], dict[str, Any]] | None = None,
        bundled: Callable[[str], bool] | None = None,
    ):
        self.reader = reader
        self.on_lookup = on_lookup
        self.on_read = on_read
        self.more_statistics = more_statistics
        self.bundled = bundled  # directories a prefetch bundle covers: no sibling prefetch
        self.on_ready = on_ready
        self._handles: dict[int, OpenFile] = {}
        self._kernel = KernelView(attr_timeout)
        self._kinds = {
            kind: packed_stat(kind, 0, 1, 0) for kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)
        }
        self._next = itertools.count(1)
        self._lock = threading.Lock()
        self.io_errors = 0
        self._prefetcher = Prefetcher(self._warm, self._cache_has_room)
        self.prefetch_siblings = prefetch_siblings
        self._warmed_dirs: set[tuple[str, str]] = set()  # (root catalog, directory)

    # -- helpers ----------------------------------------------------------------------

    def _entry(self, path: str) -> Entry:
        try:
            if self.reader.refresh():
                self._kernel.switched(time.monotonic())
            return self.reader.lookup(path)
        except NotFoundError as exc:
            raise FuseOSError(errno.ENOENT) from exc
        except FormatError as exc:
            if "path" in str(exc):
                raise FuseOSError(errno.ENOENT) from exc
            raise self._eio(path, exc) from exc
        except CvmfsError as exc:
            raise self._eio(path, exc) from exc

    def _eio(self, path: str, exc: Exception) -> FuseOSError:
        self.io_errors += 1
        log.error("I/O error on %s via %s: %s", path, self.reader.fetcher.describe(), exc)
        return FuseOSError(errno.EIO)

    def _route(self) -> tuple[str, str]:
        fetcher = self.reader.fetcher
        inner = getattr(fetcher, "inner", fetcher)
        current = getattr(inner, "current", None)
        return current if current is not None else (fetcher.describe(), "DIRECT")

    def statistics(self) -> dict[str, Any]:
        """What `cvmfs-client stat` shows, read through the user.stats attribute."""
        manifest = self.reader.manifest
        cache = self.reader.cache
        host, proxy = self._route()
        inner = getattr(self.reader.fetcher, "inner", self.reader.fetcher)
        stats: dict[str, Any] = {
            "repository": manifest.name if manifest else "",
            "revision": manifest.revision if manifest else 0,
            "host": host,
            "proxy": proxy,
            "offline": bool(getattr(self.reader.fetcher, "offline", False)),
            "io_errors": self.io_errors,
            "fetch_failures": getattr(inner, "failures", 0),
            # as received over the network, compressed; a directory fetcher counts none
            "bytes_downloaded": getattr(inner, "bytes_downloaded", 0),
        }
        if cache is not None:
            stats.update(
                cache_dir=cache.directory,
                cache_bytes=cache.used,
                cache_quota=cache.quota,
                hits=cache.stats.hits,
                misses=cache.stats.misses,
                content_fetched=cache.stats.bytes_fetched,
                evictions=cache.stats.evictions,
                corrupt_entries=cache.stats.corrupt_entries,
                fetch_wait_s=round(cache.stats.fetch_wait_s, 3),
            )
        if self.more_statistics is not None:
            stats.update(self.more_statistics())
        return stats

    # -- operations -------------------------------------------------------------------

    def init(self, path: str) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def _stat(self, entry: Entry) -> c_stat:
        nlink = 2 if entry.is_dir else self.reader.link_count(entry)
        return packed_stat(entry.mode, entry.size, nlink, entry.mtime_ns)

    @on_fuse_thread
    def getattr(self, path: str, fh: int | None = None) -> c_stat:
        entry = self._entry(path)
        if entry.is_file:
            if self.on_lookup is not None:
                self.on_lookup(entry.path, entry)
            entry = entry._replace(size=self._kernel.size_to_tell(entry.path, entry.size))
        return self._stat(entry)

    @on_fuse_thread
    def readdir(self, path: str, fh: int) -> list[tuple[bytes, c_stat]]:
        entry = self._entry(path)
        if not entry.is_dir:
            raise FuseOSError(errno.ENOTDIR)
        try:
            children = self.reader.listdir(entry.path)
        except CvmfsError as exc:
            raise self._eio(path, exc) from exc
        # The type of each entry (d_type), so `find -type f` and Python's import
        # scanning need no lookup per file; libfuse sends the kernel nothing else.
        kinds = self._kinds
        return [
            (b".", kinds[stat.S_IFDIR]),
            (b"..", kinds[stat.S_IFDIR]),
            *((c.name.encode(), kinds[stat.S_IFMT(c.mode)]) for c in children),
        ]

    @on_fuse_thread
    def readlink(self, path: str) -> str:
        entry = self._entry(path)
        if not entry.is_symlink or entry.target is None:
            raise FuseOSError(errno.EINVAL)
        return entry.target

    @on_fuse_thread
    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise FuseOSError(errno.EROFS)
        self._entry(path)
        return 0

    @on_fuse_thread
    def open(self, path: str, flags: int) -> Opened:
        if flags & WRITE_FLAGS:
            raise FuseOSError(errno.EROFS)
        entry = self._entry(path)
        if not entry.is_file:
            raise FuseOSError(errno.EISDIR if entry.is_dir else errno.EINVAL)
        if self.on_lookup is not None:
            self.on_lookup(entry.path, entry)
        try:
            content = open_content(self.reader, entry, self._prefetcher.chunks)
        except CvmfsError as exc:
            raise self._eio(path, exc) from exc
        identity = entry.hash or "".join(c.hash for c in content.chunks)
        handle = OpenFile(content, content.readinto, identity, self.reader.root_hash)
        keep, direct = self._kernel.opening(entry.path, identity, entry.size, time.monotonic())
        with self._lock:
            number = next(self._next)
            self._handles[number] = handle
        self._prefetch_siblings(entry)
        return Opened(number, keep, direct)

    def _prefetch_siblings(self, entry: Entry) -> None:
        """Programs open many files of one directory in a row (an import reads a
        package's modules, a setup script sources its neighbours): when the first one is
        opened, fetch the directory's other files in the background, so the next opens
        find them in the cache instead of waiting for the network one by one."""
        cache = self.reader.cache
        if not self.prefetch_siblings or cache is None:
            return
        parent = entry.path.rpartition("/")[0] or "/"
        if self.bundled is not None and self.bundled(parent):
            return
        key = (self.reader.root_hash, parent)
        with self._lock:
            if key in self._warmed_dirs:
                return
            self._warmed_dirs.add(key)
        try:
            children = self.reader.listdir(parent)
        except CvmfsError as exc:
            log.info("prefetch of %s failed: %s", parent, exc)
            return
        self._prefetcher.siblings(entry, children, cache.__contains__)

    def _cache_has_room(self, size: int) -> bool:
        cache = self.reader.cache
        return (
            cache is None or cache.quota is None or cache.used + size <= cache.quota * CACHE_SHARE
        )

    @on_fuse_thread
    def read(self, buffer: memoryview, offset: int, fh: int) -> int:
        """Read up to len(buffer) bytes at offset into buffer; returns the count."""
        handle = self._handles[fh]
        if self.on_read is not None:
            entry = handle.content.entry
            self.on_read(entry.path, entry, offset, len(buffer))
        try:
            return handle.readinto(buffer, offset)
        except CvmfsError as exc:
            raise self._eio(handle.content.entry.path, exc) from exc

    def _warm(self, chunk: Chunk) -> None:
        warm(self.reader, chunk)

    @on_fuse_thread
    def release(self, path: str, fh: int) -> int:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is None:
            return 0
        before_switch = handle.root != self.reader.root_hash
        entry = handle.content.entry
        self._kernel.closed(
            entry.path, handle.identity, entry.size, before_switch, time.monotonic()
        )
        handle.content.close()
        return 0

    @on_fuse_thread
    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    @on_fuse_thread
    def listxattr(self, path: str) -> list[str]:
        entry = self._entry(path)
        names = list(ROOT_XATTRS) if entry.path == "/" else []
        if entry.is_file:
            names.append("user.hash" if not entry.chunked else "user.chunks")
        return names

    @on_fuse_thread
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        entry = self._entry(path)
        manifest = self.reader.manifest
        values: dict[str, str] = {}
        if entry.path == "/" and manifest is not None:
            values["user.revision"] = str(manifest.revision)
            values["user.host"], values["user.proxy"] = self._route()
            values["user.root_hash"] = self.reader.root_hash
            values["user.stats"] = json.dumps(self.statistics())
        if entry.is_file and entry.hash is not None:
            values["user.hash"] = entry.hash
        if entry.chunked:
            values["user.chunks"] = str(len(self.reader.chunks(entry)))
        if name not in values:
            raise FuseOSError(ENOATTR)
        return values[name].encode()
