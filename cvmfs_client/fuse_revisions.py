"""Following new revisions under a low-level mount whose kernel caches names,
attributes and listings for a day: a thread of its own looks for a new revision every
half TTL, and after a switch tells the kernel to drop exactly what changed.

Notifications go from this thread only: the kernel may hold a directory's lock while it
waits for a request's reply, and a notification about that directory takes the lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cvmfs_client.fuse_inodes import DirectoryView
from cvmfs_client.fuse_ll_ops import RepositoryOps, listing_signature
from cvmfs_format.errors import CvmfsError, NotFoundError

log = logging.getLogger(__name__)

MIN_PERIOD_S = 0.25
MAX_PERIOD_S = 60.0
STOP_WAIT_S = 10.0  # an invalidation under way after unmount fails fast (ENOTCONN)


class Kernel:
    """The notifications the invalidation sends (fuse_lowlevel.Session's)."""

    def __init__(self, inval_entry: Callable[[int, bytes], int], inval_inode: Callable[[int], int]):
        self.inval_entry = inval_entry
        self.inval_inode = inval_inode


class RevisionFollower:
    def __init__(self, ops: RepositoryOps, kernel: Kernel, ttl: float):
        self.ops = ops
        self.kernel = kernel
        self.period = min(max(ttl / 2, MIN_PERIOD_S), MAX_PERIOD_S)
        self._wake = threading.Event()
        self._stop = False
        self.invalidations = 0  # entries and inodes the kernel was told to drop
        self._pending = False  # a switch whose invalidation has not run yet
        self._expired = False  # the kernel's entries were evicted for an expired manifest
        ops.on_switch = self._switch_seen
        self._thread = threading.Thread(target=self._run, name="revisions", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Returns once no notification can be under way (the session goes next)."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_S)

    def _switch_seen(self) -> None:
        self._pending = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.period)
            self._wake.clear()
            if self._stop:
                return
            try:
                if self.ops.reader.refresh():
                    self.ops.note_switch()  # sets _pending
                self._expired = False
            except CvmfsError:  # expired and not renewed
                if not self._expired:  # from now on every name is asked for, and refused
                    self._expired = True
                    log.warning("manifest expired: evicting every known entry")
                    for directory in self.ops.table.directories():
                        self._evict(directory)
            if self._pending:
                self._pending = False
                self.switched()

    def switched(self) -> None:
        """The reader serves a new revision: invalidate what changed, then announce it."""
        manifest = self.ops.reader.manifest
        revision = manifest.revision if manifest else 0
        try:
            for directory in self.ops.table.directories():
                self._invalidate(directory)
        except (CvmfsError, OSError) as exc:
            log.warning("exact invalidation failed (%s): evicting every known entry", exc)
            for directory in self.ops.table.directories():
                self._evict(directory)
        self.ops.revision = revision
        log.info("revision %d served; %d kernel entries invalidated", revision, self.invalidations)

    def _drop_entry(self, parent: int, name: str) -> None:
        self.invalidations += 1
        self.kernel.inval_entry(parent, name.encode())

    def _drop_inode(self, ino: int) -> None:
        self.invalidations += 1
        self.kernel.inval_inode(ino)

    def _invalidate(self, old: DirectoryView) -> None:
        ops = self.ops
        try:
            entry = ops.reader.lookup(old.path)
            children = ops.reader.listdir(old.path) if entry.is_dir else None
        except NotFoundError:
            children = None
        if children is None:  # gone, or no longer a directory: its parent drops its name
            self._evict(old)
            return
        listing = {c.name: c for c in children}
        for name, key in old.children.items():
            new = listing.get(name)
            if new is None or ops.key_of(new) != key:
                self._drop_entry(old.ino, name)
        for name in old.negatives:
            if name in listing:
                self._drop_entry(old.ino, name)
        dropped_listing = old.listing is not None and old.listing != listing_signature(children)
        if dropped_listing or entry != old.entry:
            self._drop_inode(old.ino)  # its listing and attributes
        ops.table.settle(old.ino, entry, dropped_listing)

    def _evict(self, old: DirectoryView) -> None:
        for name in (*old.children, *old.negatives):
            self._drop_entry(old.ino, name)
        self._drop_inode(old.ino)
