"""What the gateway checks before it publishes an upload: every uploaded catalog follows
the rules a reader applies (cvmfs_format.catalog_rules), lies inside the leased path,
and names only stored objects whose content sizes are the sizes it gives them.

Catalogs identical to the head revision's at the same path were checked when they were
published and are skipped, so re-publishing a large, mostly unchanged tree is cheap.
"""

from __future__ import annotations

import stat
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from cvmfs_format import paths
from cvmfs_format.catalog import FLAG_NESTED_ROOT, Catalog, NestedRef
from cvmfs_format.catalog_rules import check_entry_row, nested_catalog_problems, validate_catalog
from cvmfs_format.catalog_writer import StoredCatalog, Subtree
from cvmfs_format.errors import CvmfsError
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import HEADER_BYTES, declared_content_size, is_hash, verify_stored
from cvmfs_format.store import Storage
from repo_server.api_errors import UploadRefused
from repo_server.errors import ObjectMissing
from repo_server.loading import load_catalog_file

HEADER_READERS = 8  # existing objects' headers are read this many at a time


def validate_upload(
    storage: Storage,
    head: Manifest,
    path: str,
    digest: str,
    mode: int,
    mtime_ns: int,
    uploaded: Mapping[str, int],
    *,
    objects: bool = True,
) -> Subtree:
    """The uploaded catalog tree rooted at digest as a Subtree to graft at path, or
    UploadRefused naming the first problem. uploaded: content sizes of the objects
    uploaded on this lease (verified then); other objects' sizes are read from storage.
    objects False: a dry run, which uploads catalogs only; their objects are not checked."""
    if not is_hash(digest):
        raise UploadRefused(f"catalog {digest!r}: not an object name")
    if not stat.S_ISDIR(mode):
        raise UploadRefused(f"{path}: the published top must be a directory")
    parent, name = paths.split(path)
    top_row = (parent, name, mode, 0, mtime_ns, None, None, 0, FLAG_NESTED_ROOT)
    try:
        check_entry_row(top_row)
    except CvmfsError as exc:
        raise UploadRefused(f"the published top {path}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="cvmfs-upload-") as scratch:
        in_head = _HeadCatalogs(storage, head, scratch)
        try:
            top, named = _walk(storage, in_head, path, digest, scratch)
        finally:
            in_head.close()
        if objects:
            _check_objects(storage, named, uploaded)
    return Subtree(path, top, mode, mtime_ns)


def _walk(
    storage: Storage, in_head: _HeadCatalogs, path: str, digest: str, scratch: str
) -> tuple[StoredCatalog, dict[str, tuple[int, str]]]:
    """The top catalog, and every object the checked catalogs name: hash -> (content
    size, the path of one entry naming it)."""
    named: dict[str, tuple[int, str]] = {}
    top_ref = in_head.ref_at(path)
    if top_ref is not None and top_ref.hash == digest:  # the same tree again
        return StoredCatalog(digest, top_ref.size, top_ref.stats, 0), named
    top: StoredCatalog | None = None
    stack: list[tuple[str, NestedRef | None]] = [(digest, None)]
    while stack:
        current, ref = stack.pop()
        if ref is not None and in_head.ref_at(ref.path) == ref:
            continue  # as the head has it: checked when it was published
        # A nested catalog's stored size is checked against its row below, with the
        # rest of what the row says (nested_catalog_problems).
        with _uploaded_catalog(storage, current, None, scratch) as (catalog, stored_size):
            if ref is None and catalog.root != path:
                raise UploadRefused(f"uploaded catalog is rooted at {catalog.root}, not {path}")
            problems = [] if ref is None else nested_catalog_problems(ref, catalog, stored_size)
            checked = validate_catalog(catalog)
            problems += checked.problems
            if problems:
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                raise UploadRefused(f"uploaded catalog {current}: {problems[0]}{more}")
            for obj in checked.objects:
                size, where = named.setdefault(obj.digest, (obj.size, obj.path))
                if size != obj.size:
                    raise UploadRefused(
                        f"{obj.path} names object {obj.digest} as {obj.size} bytes, "
                        f"{where} as {size} bytes"
                    )
            stack.extend((nested.hash, nested) for nested in catalog.nested.values())
            if ref is None:
                top = StoredCatalog(current, stored_size, catalog.stats(), 0)
    assert top is not None
    return top, named


@contextmanager
def _uploaded_catalog(
    storage: Storage, digest: str, stored_size: int | None, scratch: str
) -> Iterator[tuple[Catalog, int]]:
    """An uploaded catalog and its stored size; UploadRefused if it is missing or bad."""
    try:
        catalog, size = load_catalog_file(storage, digest, stored_size, scratch)
    except ObjectMissing:
        raise UploadRefused(f"catalog {digest} was not uploaded; publish again") from None
    except CvmfsError as exc:
        raise UploadRefused(f"uploaded catalog {digest}: {exc}") from None
    try:
        yield catalog, size
    finally:
        catalog.close()


class _HeadCatalogs:
    """Which catalog the head revision has at a path, loading the catalogs on the way."""

    def __init__(self, storage: Storage, head: Manifest, scratch: str):
        self.storage = storage
        self.scratch = scratch
        self.root = head.root_hash, head.root_size
        self._loaded: dict[str, Catalog] = {}
        self._refs: dict[str, NestedRef | None] = {}

    def _catalog(self, digest: str, stored_size: int) -> Catalog:
        if digest not in self._loaded:
            catalog, _ = load_catalog_file(self.storage, digest, stored_size, self.scratch)
            self._loaded[digest] = catalog
        return self._loaded[digest]

    def ref_at(self, path: str) -> NestedRef | None:
        """The head's nested row for the catalog rooted at path (for "/", the root
        catalog's hash, size and statistics), or None if the head has none there."""
        if path not in self._refs:
            self._refs[path] = self._find(path)
        return self._refs[path]

    def _find(self, path: str) -> NestedRef | None:
        catalog = self._catalog(*self.root)
        if path == "/":
            return NestedRef("/", self.root[0], self.root[1], catalog.stats())
        while True:
            ref = catalog.nested_for(path)
            if ref is None or ref.path == path:
                return ref
            catalog = self._catalog(ref.hash, ref.size)

    def close(self) -> None:
        for catalog in self._loaded.values():
            catalog.close()


def _check_objects(
    storage: Storage, named: dict[str, tuple[int, str]], uploaded: Mapping[str, int]
) -> None:
    """Every named object is stored, with the content size its entries give it."""
    missing = storage.missing(named)
    if missing:
        raise UploadRefused(
            f"{len(missing)} objects the upload names are not stored (e.g. {min(missing)}); "
            "publish again to upload them"
        )
    unknown = [d for d in named if d not in uploaded]
    # A future per object would cost more than its read: each reader takes a share.
    shares = [unknown[i::HEADER_READERS] for i in range(HEADER_READERS)]
    sizes: dict[str, int] = {}
    with ThreadPoolExecutor(HEADER_READERS) as pool:
        found = pool.map(lambda share: [_content_size(storage, d) for d in share], shares)
        for share, share_sizes in zip(shares, found, strict=True):
            sizes.update(zip(share, share_sizes, strict=True))
    for digest, (size, where) in named.items():
        actual = uploaded.get(digest, sizes.get(digest))
        if actual != size:
            raise UploadRefused(
                f"{where} names object {digest} as {size} bytes, but its content is {actual} bytes"
            )


def _content_size(storage: Storage, digest: str) -> int:
    """A stored object's content size, reading only its header when that says it (a
    stored object was verified when it was written, so its header is true)."""
    head, stored_size = storage.object_head(digest, HEADER_BYTES)
    size = declared_content_size(head, stored_size)
    if size is None:
        size = verify_stored(storage.get_object(digest), digest)
    return size
