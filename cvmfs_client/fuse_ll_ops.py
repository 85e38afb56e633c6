"""The low-level FUSE operations: kernel requests by inode, answered from a
RepositoryReader through the inode table (fuse_inodes.py).

Read-only; every byte served comes from a verified cache file, opened for each READ,
so a cache entry changed behind the mount is hashed again before it is served. A
failure to fetch or verify an object is EIO for that file only.
"""

from __future__ import annotations

import errno
import logging
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cvmfs_client import mount_info
from cvmfs_client.content import ChunkedObject, open_content, warm
from cvmfs_client.fuse_inodes import InodeTable, Node, content_key
from cvmfs_client.fuse_lowlevel import AddEntry, Attr, Reply
from cvmfs_client.prefetch import CACHE_SHARE, Prefetcher
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.catalog import Chunk, Entry, check_chunk_list
from cvmfs_format.errors import CvmfsError, FormatError, NotFoundError

log = logging.getLogger(__name__)

DAY = 86400.0  # entry, attribute and negative timeouts: switches invalidate explicitly
OnLookup = Callable[[str, Entry], None]
OnRead = Callable[[str, Entry, int, int], None]


def listing_signature(children: Sequence[Entry]) -> int:
    """What a READDIR reply of a directory depends on: its names and their types."""
    return hash(frozenset((c.name, stat.S_IFMT(c.mode)) for c in children))


class RepositoryOps:
    """Implements fuse_lowlevel.LowLevelFS. on_lookup(path, entry) is called after each
    successful LOOKUP of a regular file, on_read(path, entry, offset, size) before each
    READ is served; both on the FUSE thread, so they must be cheap."""

    def __init__(
        self,
        reader: RepositoryReader,
        on_ready: Callable[[], Any] | None = None,
        *,
        prefetch_siblings: bool = True,
        timeout: float = DAY,
        on_lookup: OnLookup | None = None,
        on_read: OnRead | None = None,
        more_statistics: Callable[[], dict[str, Any]] | None = None,
        bundled: Callable[[str], bool] | None = None,
    ):
        self.reader = reader
        # More to show in `cvmfs-client stat`: the FUSE session's request counts, bundles.
        self.statistics_sources = [more_statistics] if more_statistics else []
        self.bundled = bundled  # directories a prefetch bundle covers: no sibling prefetch
        self.on_ready = on_ready
        self.timeout = timeout
        self.on_lookup = on_lookup
        self.on_read = on_read
        self.table = InodeTable(reader.lookup("/"))
        self.io_errors = 0
        self.prefetch_siblings = prefetch_siblings
        self._prefetcher = Prefetcher(self._warm, self._cache_has_room)
        self._warmed_dirs: set[str] = set()  # of the revision served now
        self._lock = threading.Lock()
        manifest = reader.manifest
        # The revision the kernel's caches agree with: a switch is announced (xattr,
        # stat) once the names it changed were invalidated (fuse_revisions.py).
        self.revision = manifest.revision if manifest else 0
        self.on_switch: Callable[[], None] = lambda: None

    # -- helpers ----------------------------------------------------------------------

    def _eio(self, path: str, exc: Exception) -> OSError:
        self.io_errors += 1
        log.error("I/O error on %s via %s: %s", path, self.reader.fetcher.describe(), exc)
        return OSError(errno.EIO, str(exc))

    def refresh(self) -> None:
        """Look for a new revision when the manifest's TTL has passed (as every request
        that touches the tree does); an expired manifest is EIO."""
        try:
            switched = self.reader.refresh()
        except CvmfsError as exc:
            raise self._eio("/", exc) from exc
        if switched:
            self.note_switch()

    def note_switch(self) -> None:
        """The reader switched revisions: prefetch bookkeeping starts afresh, and the
        kernel's caches are to be invalidated (on_switch wakes fuse_revisions)."""
        with self._lock:
            self._warmed_dirs.clear()
        self.on_switch()

    def _lookup_path(self, path: str) -> Entry | None:
        """The entry at path in the revision served now; None if there is none."""
        try:
            return self.reader.lookup(path)
        except NotFoundError:
            return None
        except FormatError as exc:
            if "path" in str(exc):
                return None
            raise self._eio(path, exc) from exc
        except CvmfsError as exc:
            raise self._eio(path, exc) from exc

    def _node(self, ino: int) -> Node:
        try:
            return self.table.get(ino)
        except KeyError:
            raise OSError(errno.ESTALE, f"inode {ino} was forgotten") from None

    def node_for(self, entry: Entry) -> Node:
        """entry's inode, created if new (with no lookups yet)."""
        chunks = None
        if entry.chunked:
            try:
                chunks = self.reader.chunks(entry)
            except CvmfsError as exc:
                raise self._eio(entry.path, exc) from exc
        return self.table.node(entry, chunks)

    def key_of(self, entry: Entry) -> str:
        return content_key(entry, self.reader.chunks(entry) if entry.chunked else None)

    def _attr(self, node: Node) -> Attr:
        entry = node.entry
        nlink = 2 if entry.is_dir else self._link_count(entry)
        return Attr(node.ino, entry.mode, entry.size, nlink, entry.mtime_ns)

    def _link_count(self, entry: Entry) -> int:
        if entry.link_group == 0:
            return 1
        try:
            return self.reader.link_count(entry)
        except CvmfsError:
            return 1  # a hard link of an older revision whose catalog is gone

    def _reply(self, node: Node) -> Reply:
        return Reply(self._attr(node), self.timeout, self.timeout)

    # -- operations -------------------------------------------------------------------

    def init(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def lookup(self, parent: int, name: bytes) -> Reply:
        directory = self._node(parent)
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise OSError(errno.ENOENT, "not UTF-8") from None  # never a cached negative
        self.refresh()
        path = f"{directory.path.rstrip('/')}/{text}"
        entry = self._lookup_path(path)
        if entry is None:
            self.table.missing(parent, text)
            return Reply(Attr(0, 0, 0, 0, 0), self.timeout, self.timeout)
        node = self.node_for(entry)
        self.table.looked_up(parent, text, node)
        if self.on_lookup is not None and entry.is_file:
            self.on_lookup(path, entry)
        return self._reply(node)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, count in items:
            self.table.forget(ino, count)

    def getattr(self, ino: int) -> tuple[Attr, float]:
        self.refresh()
        return self._attr(self._node(ino)), self.timeout

    def readlink(self, ino: int) -> bytes:
        entry = self._node(ino).entry
        if not entry.is_symlink or entry.target is None:
            raise OSError(errno.EINVAL, "not a symlink")
        return entry.target.encode()

    def read(self, ino: int, buffer: memoryview, offset: int) -> int:
        node = self._node(ino)
        entry = node.entry
        if not entry.is_file:
            raise OSError(errno.EISDIR, entry.path)
        if self.on_read is not None:
            self.on_read(entry.path, entry, offset, len(buffer))
        if offset == 0:
            self._prefetch_siblings(entry)
        try:
            if node.chunks is None:
                return self._read_whole(entry, buffer, offset)
            content = node.state
            if content is None:
                check_chunk_list(entry.path, entry.size, node.chunks)
                content = node.state = ChunkedObject(
                    self.reader, entry, node.chunks, self._prefetcher.chunks
                )
            assert isinstance(content, ChunkedObject)
            return content.readinto(buffer, offset)
        except CvmfsError as exc:
            if node.failed:  # the kernel retries a failed read-ahead page by page
                raise OSError(errno.EIO, str(exc)) from exc
            node.failed = True
            raise self._eio(entry.path, exc) from exc

    def _read_whole(self, entry: Entry, buffer: memoryview, offset: int) -> int:
        """Through an fd pinned for this READ only: the cache checks its entry (one
        fstat) each time, as it did at each open before."""
        with open_content(self.reader, entry) as content:
            return content.readinto(buffer, offset)

    def readdir(self, ino: int, offset: int, add: AddEntry, plus: bool) -> None:
        """READDIR, or READDIRPLUS when the kernel asks for it (it does for a directory's
        first listing, then after lookups in it). Plus entries count as lookups: an
        import lists each package directory and then looks up names in it, and the
        plus entries spared 1,588 of a cold import's 3,919 LOOKUPs (bench/mount_bench.py).
        Offsets: 1 and 2 follow . and .., n + 2 the n-th child."""
        self.refresh()
        node = self._node(ino)
        if not node.entry.is_dir:
            raise OSError(errno.ENOTDIR, node.path)
        try:
            children = self.reader.listdir(node.path)
        except NotFoundError:
            raise OSError(errno.ENOENT, node.path) from None
        except CvmfsError as exc:
            raise self._eio(node.path, exc) from exc
        if offset == 0:
            self.table.listed(ino, listing_signature(children))
        dot = Reply(Attr(ino, stat.S_IFDIR, 0, 2, 0), 0, 0)
        for index, name in ((0, b"."), (1, b"..")):
            if offset <= index and not add(name, dot, index + 1):
                return
        for index in range(max(offset - 2, 0), len(children)):
            child = children[index]
            if not plus:  # only the type and an inode number travel in a READDIR reply
                pseudo = (1 << 62) | (hash(child.path) & ((1 << 61) - 1))
                if not add(child.name.encode(), Reply(Attr(pseudo, child.mode, 0, 1, 0), 0, 0),
                           index + 3):  # fmt: skip
                    return
                continue
            child_node = self.node_for(child)
            if not add(child.name.encode(), self._reply(child_node), index + 3):
                self.table.unused(child_node)
                return
            self.table.looked_up(ino, child.name, child_node)

    def statfs(self, ino: int) -> tuple[int, int]:
        return 4096, 255

    def listxattr(self, ino: int) -> list[bytes]:
        return [n.encode() for n in mount_info.xattr_names(self._node(ino).entry)]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.refresh()
        node = self._node(ino)
        value = mount_info.xattr(
            self.reader, node.entry, name.decode(errors="replace"), self.statistics(), node.chunks
        )
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value.encode()

    def statistics(self) -> dict[str, Any]:
        """What `cvmfs-client stat` shows: the reader's and cache's counters, the inodes
        the kernel holds, and what statistics_sources add."""
        stats = mount_info.statistics(self.reader, self.io_errors, self.revision)
        stats["inodes"] = len(self.table)
        for source in self.statistics_sources:
            stats.update(source())
        return stats

    # -- prefetch -----------------------------------------------------------------------

    def _prefetch_siblings(self, entry: Entry) -> None:
        """Programs read many files of one directory in a row (an import reads a
        package's modules): at the first READ in a directory, fetch its other files in
        the background. The first read, not the first lookup: `ls -l` and an import's
        stat calls look files up without reading them."""
        cache = self.reader.cache
        if not self.prefetch_siblings or cache is None:
            return
        parent = entry.path.rpartition("/")[0] or "/"
        if self.bundled is not None and self.bundled(parent):
            return
        with self._lock:
            if parent in self._warmed_dirs:
                return
            self._warmed_dirs.add(parent)
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

    def _warm(self, chunk: Chunk) -> None:
        cache = self.reader.cache
        if cache is not None and chunk.hash in cache:
            # A reader fetched it while it was queued. Not opened again here: a worker
            # that lags would hash and repair an entry changed since, under `cache
            # verify`; the next READ of it checks it anyway.
            return
        warm(self.reader, chunk)

    def close(self) -> None:
        self._prefetcher.close()
