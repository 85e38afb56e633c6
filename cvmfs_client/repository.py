"""A verified, read-only view of one repository revision, independent of FUSE.

Everything it returns has been checked against the hash chain that ends in the signed
manifest (docs/FORMAT.md, "Verification").
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cvmfs_client.content import open_content, pieces
from cvmfs_client.fetch_pool import FetchPool, PoolUnavailable
from cvmfs_client.network import not_a_repository
from cvmfs_format import paths
from cvmfs_format.catalog import Catalog, Chunk, Entry, NestedRef
from cvmfs_format.catalog_rules import check_nested_catalog, check_root_catalog
from cvmfs_format.errors import CvmfsError, NotFoundError
from cvmfs_format.history import History
from cvmfs_format.manifest import MANIFEST_FILE, Manifest
from cvmfs_format.objects import ObjectRef
from cvmfs_format.signed import MAX_DOCUMENT_SIZE
from cvmfs_format.trust import TrustedState
from cvmfs_format.whitelist import WHITELIST_FILE

if TYPE_CHECKING:  # the publisher reads repositories without loading pycurl
    from cvmfs_client.cache import ObjectCache, StagedFile
    from cvmfs_client.fetcher import Fetcher

log = logging.getLogger(__name__)

CACHED_ENTRIES = 65536  # catalog rows kept in memory, about 25 MB
EXPIRED_RETRY_S = 10  # how often an expired mount asks its sources for a renewed manifest


class TreeView:
    """In-memory directory listings, the catalogs opened and the catalog of each
    directory, for one root catalog: a revision switch replaces the whole view, so no
    lookup mixes revisions, and an old revision's catalogs are closed (and unpinned in
    the cache) once the requests still using its view are done.

    A lookup loads its parent's whole listing with one query; siblings, negative
    lookups and readdir are then dictionary hits. Least recently used listings are
    dropped once more than `capacity` entries are held.
    """

    def __init__(self, root: tuple[str, int], capacity: int = CACHED_ENTRIES):
        self.root = root
        self.capacity = capacity
        self.listings: OrderedDict[str, dict[str, Entry]] = OrderedDict()
        self.held = 0
        self.catalogs: dict[str, Catalog] = {}  # by directory
        self.opened: dict[str, Catalog] = {}  # by hash
        self.lock = threading.Lock()

    def listing(self, dirpath: str) -> dict[str, Entry] | None:
        with self.lock:
            found = self.listings.get(dirpath)
            if found is not None:
                self.listings.move_to_end(dirpath)
            return found

    def remember(self, dirpath: str, listing: dict[str, Entry]) -> None:
        with self.lock:
            if dirpath in self.listings:
                return
            self.listings[dirpath] = listing
            self.held += len(listing)
            while self.held > self.capacity and len(self.listings) > 1:
                _, dropped = self.listings.popitem(last=False)
                self.held -= len(dropped)


class RepositoryReader:
    def __init__(
        self,
        fetcher: Fetcher,
        trust: TrustedState,
        *,
        clock: Callable[[], float] = time.time,
        cache: ObjectCache | None = None,
        max_ttl: float | None = None,
        cached_entries: int = CACHED_ENTRIES,
    ):
        self.fetcher = fetcher
        self.trust = trust
        self.clock = clock
        self.cache = cache
        # (hash, stored size) of the root catalog in use: one tuple, replaced whole, so a
        # lookup never mixes two revisions.
        self.cached_entries = cached_entries
        self._view = TreeView(("", 0), cached_entries)
        self.max_ttl = max_ttl
        self.pinned = False
        self._loaded_at = 0.0
        self._refresh_lock = threading.Lock()
        self.on_new_revision: Callable[[Manifest], None] | None = None
        # Fetches objects into the cache in worker processes (a mount's daemon sets it).
        self.pool: FetchPool | None = None

    @property
    def manifest(self) -> Manifest | None:
        return self.trust.manifest

    @property
    def root_hash(self) -> str:
        return self._view.root[0]

    @property
    def root_size(self) -> int:
        return self._view.root[1]

    def _use_root(self, digest: str, size: int) -> None:
        if self._view.root != (digest, size):
            self._view = TreeView((digest, size), self.cached_entries)

    # -- manifest and revision selection -------------------------------------------

    def load_manifest(self) -> Manifest:
        """Fetch whitelist and manifest and have the trust state accept them; select the
        newest revision (unless an older one is pinned)."""
        now = self.clock()
        trust = self.trust
        try:
            self.fetcher.fetch(
                WHITELIST_FILE, MAX_DOCUMENT_SIZE, lambda data: trust.update_whitelist(data, now)
            )
            manifest = self.fetcher.fetch(
                MANIFEST_FILE, MAX_DOCUMENT_SIZE, lambda data: trust.update_manifest(data, now)
            )
        except NotFoundError as exc:
            raise not_a_repository(self.fetcher.describe(), str(exc)) from exc
        self._loaded_at = self.clock()
        if not self.pinned:
            self._use_root(manifest.root_hash, manifest.root_size)
        return manifest

    def refresh(self) -> bool:
        """Once the manifest's TTL has passed, look for a newer revision and switch new
        lookups to it. Never blocks a second caller; failures keep the current revision
        until it expires: then VerificationError, since an expired manifest must not be
        served. Returns True when the revision changed."""
        manifest = self.manifest
        if manifest is None:
            return False
        now = self.clock()
        expired = now >= self._expires()
        ttl = manifest.ttl if self.max_ttl is None else min(manifest.ttl, self.max_ttl)
        if expired:
            ttl = min(ttl, EXPIRED_RETRY_S)  # ask again soon, not on every lookup
        elif self.pinned:
            return False
        if now - self._loaded_at < ttl or not self._refresh_lock.acquire(blocking=False):
            if expired:
                self.trust.check_fresh(now)
            return False
        try:
            self._loaded_at = now
            new = self.load_manifest()
        except CvmfsError as exc:
            log.warning(
                "looking for a new revision failed, staying on %d: %s", manifest.revision, exc
            )
            self.trust.check_fresh(self.clock())
            return False
        finally:
            self._refresh_lock.release()
        if new.revision != manifest.revision:
            log.info("switched from revision %d to %d", manifest.revision, new.revision)
            if self.on_new_revision is not None:
                self.on_new_revision(new)
            return True
        return False

    def _expires(self) -> float:
        whitelist, manifest = self.trust.whitelist, self.trust.manifest
        return min(
            whitelist.expires if whitelist else float("inf"),
            manifest.expires if manifest else float("inf"),
        )

    def history(self) -> History:
        manifest = self.manifest or self.load_manifest()
        data = self.fetch_object(manifest.history_hash, manifest.history_size, stored=True)
        return History(data, manifest.history_hash)

    def select_revision(self, *, revision: int | None = None, tag: str | None = None) -> int:
        """Pin an older revision (by number or tag) from the signed history."""
        history = self.history()
        number = history.tag(tag).revision if tag is not None else revision
        if number is None:
            raise ValueError("select_revision needs a revision or a tag")
        record = history.revision(number)
        self._use_root(record.root_hash, record.root_size)
        self.pinned = True
        return number

    # -- objects and catalogs -------------------------------------------------------

    def fetch_object(self, digest: str, size: int, *, stored: bool = False) -> bytes:
        """Fetch and verify an object. `size` is its content size, or with stored=True
        the stored size that the manifest and nested-catalog rows record."""
        ref = ObjectRef(digest, size, exact_stored=stored)
        return self.fetcher.fetch(ref.path, ref.max_stored, ref.decode)

    def fetch_content(self, digest: str, size: int) -> bytes | StagedFile:
        """An object's verified content for the cache: from a worker process when the
        reader has a pool, fetched here when not (or when no worker can start)."""
        if self.pool is not None:
            try:
                return self.pool.fetch(digest, size)
            except PoolUnavailable as exc:
                log.warning("%s; fetching in the mount's own process", exc)
        return self.fetch_object(digest, size)

    def open_object(self, digest: str, size: int) -> int:
        """A pinned fd on the object's verified content in the cache (without a cache, as
        for `cat`, in memory); see close_object."""
        if self.cache is None:
            fd = os.memfd_create(digest[:16], os.MFD_CLOEXEC)
            with open(fd, "wb", closefd=False) as f:
                f.write(self.fetch_object(digest, size))
            return fd
        return self.cache.acquire(digest, lambda: self.fetch_content(digest, size), size)

    def close_object(self, digest: str, fd: int) -> None:
        if self.cache is None:
            os.close(fd)
        else:
            self.cache.release(digest, fd)

    def catalog(self, digest: str, stored_size: int, view: TreeView | None = None) -> Catalog:
        """A catalog of view (default: the current one), opened once per view. In the
        cache, its file stays pinned while the catalog object lives."""
        view = view or self._view
        with view.lock:
            cached = view.opened.get(digest)
        if cached is not None:
            return cached
        if self.cache is not None:
            path = self.cache.pin_file(
                digest, lambda: self.fetch_object(digest, stored_size, stored=True)
            )
            catalog = Catalog.from_file(path, digest)
            weakref.finalize(catalog, self.cache.release, digest)
        else:
            catalog = Catalog.from_bytes(
                self.fetch_object(digest, stored_size, stored=True), digest
            )
        with view.lock:
            return view.opened.setdefault(digest, catalog)

    def root_catalog(self, view: TreeView | None = None) -> Catalog:
        view = view or self._view
        if not view.root[0]:
            self.load_manifest()
            view = self._view
        catalog = self.catalog(*view.root, view=view)
        check_root_catalog(catalog)
        return catalog

    def catalog_for_dir(self, dirpath: str) -> Catalog:
        """The catalog that lists the children of dirpath, loading nested ones on the way."""
        view = self._view
        catalog = view.catalogs.get(dirpath)
        if catalog is not None:
            return catalog
        catalog = self.root_catalog(view)
        while True:
            ref: NestedRef | None = catalog.nested_for(dirpath)
            if ref is None:
                break
            catalog = self.catalog(ref.hash, ref.size, view)
            check_nested_catalog(ref, catalog)
        with view.lock:
            view.catalogs[dirpath] = catalog
        return catalog

    # -- the tree -------------------------------------------------------------------

    def _listing(self, dirpath: str) -> dict[str, Entry]:
        view = self._view
        listing = view.listing(dirpath)
        if listing is None:
            children = self.catalog_for_dir(dirpath).children(dirpath)
            listing = {child.name: child for child in children}
            view.remember(dirpath, listing)
        return listing

    def lookup(self, path: str) -> Entry:
        # Listings are keyed by normalised paths only, so a hit needs no normalising.
        parent, _, name = path.rpartition("/")
        listing = self._view.listing(parent or "/") if name else None
        if listing is not None and name in listing:
            return listing[name]
        path = paths.normalize(path)
        parent, name = paths.split(path)
        entry = self._listing(parent).get(name) if parent else self.root_catalog().entry(path)
        if entry is None:
            raise NotFoundError(f"{path}: no such file or directory")
        return entry

    def listdir(self, path: str) -> list[Entry]:
        entry = self.lookup(path)
        if not entry.is_dir:
            raise NotFoundError(f"{entry.path}: not a directory")
        return list(self._listing(entry.path).values())

    def link_count(self, entry: Entry) -> int:
        if entry.link_group == 0:
            return 1
        parent, _ = paths.split(entry.path)
        return self.catalog_for_dir(parent).link_count(entry.link_group)

    def chunks(self, entry: Entry) -> list[Chunk]:
        parent, _ = paths.split(entry.path)
        return self.catalog_for_dir(parent).chunks(entry.path)

    def iter_content(self, entry: Entry) -> Iterator[bytes]:
        """A regular file's verified content, chunk by chunk (cvmfs_client.content)."""
        with open_content(self, entry) as content:
            yield from pieces(content)
