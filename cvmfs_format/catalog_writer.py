"""Writing catalogs: building new ones and grafting a published subtree into a revision.

A graft rewrites only the catalogs on the path from the root to the published prefix;
every other catalog object is reused unchanged (docs/FORMAT.md, "Publishing").
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from cvmfs_format import paths
from cvmfs_format.catalog import (
    ENTRY_COLUMNS,
    FLAG_NESTED_ROOT,
    SCHEMA,
    SCHEMA_VERSION,
    Catalog,
    NestedRef,
    TreeStats,
)
from cvmfs_format.errors import PathConflict
from cvmfs_format.objects import ObjectRef, content_hash, encode_object
from cvmfs_format.store import ObjectSink

EntryRow = tuple[str, str, int, int, int, "str | None", "str | None", int, int]


@dataclass(frozen=True)
class StoredCatalog:
    hash: str
    size: int  # stored bytes
    stats: TreeStats
    new_bytes: int  # stored bytes written now (0 if the object existed)


class CatalogBuilder:
    """An in-memory SQLite catalog; serialised into an object when finished."""

    def __init__(self, root: str, data: bytes | None = None):
        self.root = root
        self.db = sqlite3.connect(":memory:")
        if data is None:
            self.db.executescript(SCHEMA)
        else:
            self.db.deserialize(data)
        self.db.execute("BEGIN")

    @classmethod
    def from_catalog(cls, catalog: Catalog, data: bytes) -> CatalogBuilder:
        return cls(catalog.root, data)

    def add_entries(self, rows: list[EntryRow]) -> None:
        self.db.executemany(
            f"INSERT INTO entries ({ENTRY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", rows
        )

    def add_chunks(self, rows: list[tuple[str, int, int, str]]) -> None:
        self.db.executemany("INSERT INTO chunks VALUES (?,?,?,?)", rows)

    def add_nested(self, ref: NestedRef) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO nested VALUES (?,?,?,?,?,?,?,?)",
            (ref.path, ref.hash, ref.size, *ref.stats.as_row()),
        )

    def entry_mode(self, path: str) -> int | None:
        parent, name = paths.split(path)
        row = self.db.execute(
            "SELECT mode FROM entries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return None if row is None else int(row[0])

    def remove_subtree(self, path: str) -> None:
        """Delete path and everything below it, nested catalog references included."""
        parent, name = paths.split(path)
        below = path + "/"
        n = len(below)
        self.db.execute("DELETE FROM entries WHERE parent = ? AND name = ?", (parent, name))
        self.db.execute(
            "DELETE FROM entries WHERE parent = ? OR substr(parent, 1, ?) = ?", (path, n, below)
        )
        self.db.execute(
            "DELETE FROM chunks WHERE path = ? OR substr(path, 1, ?) = ?", (path, n, below)
        )
        self.db.execute(
            "DELETE FROM nested WHERE path = ? OR substr(path, 1, ?) = ?", (path, n, below)
        )

    def stats(self) -> TreeStats:
        """Totals of this catalog's own entries plus those of its nested catalogs."""
        own = self.db.execute(
            "SELECT "
            f"COALESCE(SUM((mode & 61440) = {stat.S_IFREG}), 0), "
            f"COALESCE(SUM((mode & 61440) = {stat.S_IFDIR}), 0), "
            f"COALESCE(SUM((mode & 61440) = {stat.S_IFLNK}), 0), "
            f"COALESCE(SUM(CASE WHEN (mode & 61440) = {stat.S_IFREG} THEN size ELSE 0 END), 0) "
            "FROM entries"
        ).fetchone()
        nested = self.db.execute(
            "SELECT COALESCE(SUM(files),0), COALESCE(SUM(dirs),0), COALESCE(SUM(symlinks),0), "
            "COALESCE(SUM(bytes),0), COALESCE(SUM(catalogs),0) FROM nested"
        ).fetchone()
        files, dirs, symlinks, size = own
        return TreeStats(files, dirs, symlinks, size, 1) + TreeStats(*nested)

    def finish(self, storage: ObjectSink, compressor: zstandard.ZstdCompressor) -> StoredCatalog:
        stats = self.stats()
        props = {
            "schema": SCHEMA_VERSION,
            "root": self.root,
            "files": stats.files,
            "dirs": stats.dirs,
            "symlinks": stats.symlinks,
            "bytes": stats.bytes,
            "catalogs": stats.catalogs,
        }
        self.db.executemany(
            "INSERT OR REPLACE INTO properties VALUES (?, ?)",
            [(k, str(v)) for k, v in props.items()],
        )
        self.db.execute("COMMIT")
        self.db.execute("VACUUM")
        content = self.db.serialize()
        self.db.close()
        digest = content_hash(content)
        stored = encode_object(content, compressor)
        written = storage.put_object(digest, stored)
        return StoredCatalog(digest, len(stored), stats, len(stored) if written else 0)


@dataclass(frozen=True)
class Subtree:
    """A published subtree: its catalog (rooted at `path`) and its top directory's entry."""

    path: str
    catalog: StoredCatalog
    mode: int
    mtime_ns: int


# Loads a catalog's verified content (the server's repo_server.loading.load_verified).
LoadCatalog = Callable[[ObjectRef], bytes]


def graft(
    storage: ObjectSink,
    load: LoadCatalog,
    root: ObjectRef,
    subtree: Subtree,
    compressor: zstandard.ZstdCompressor,
    now_ns: int,
) -> StoredCatalog:
    """Return the new root catalog with `subtree` in place of whatever was at its path."""
    if subtree.path == "/":
        return subtree.catalog
    return _graft_into(storage, load, root, subtree, compressor, now_ns)


def _graft_into(
    storage: ObjectSink,
    load: LoadCatalog,
    ref: ObjectRef,
    subtree: Subtree,
    compressor: zstandard.ZstdCompressor,
    now_ns: int,
) -> StoredCatalog:
    data = load(ref)
    catalog = Catalog.from_bytes(data, ref.digest)
    target = subtree.path
    parent, name = paths.split(target)
    inner = catalog.nested_for(parent)
    builder = CatalogBuilder.from_catalog(catalog, data)
    if inner is not None:
        nested = ObjectRef.catalog(inner.hash, inner.size)
        child = _graft_into(storage, load, nested, subtree, compressor, now_ns)
        builder.add_nested(NestedRef(inner.path, child.hash, child.size, child.stats))
    else:
        _ensure_directories(builder, catalog.root, parent, now_ns)
        builder.remove_subtree(target)
        builder.add_entries(
            [(parent, name, subtree.mode, 0, subtree.mtime_ns, None, None, 0, FLAG_NESTED_ROOT)]
        )
        new = subtree.catalog
        builder.add_nested(NestedRef(target, new.hash, new.size, new.stats))
    catalog.close()
    return builder.finish(storage, compressor)


def _ensure_directories(builder: CatalogBuilder, root: str, dirpath: str, now_ns: int) -> None:
    """Create the missing directories between a catalog's root and dirpath."""
    missing = []
    for path in [*paths.ancestors(dirpath), dirpath]:
        if not paths.is_within(path, root) or path == root:
            continue
        mode = builder.entry_mode(path)
        if mode is None:
            missing.append(path)
        elif not stat.S_ISDIR(mode):
            raise PathConflict(f"cannot publish below {path}: it exists and is not a directory")
    rows: list[EntryRow] = []
    for path in missing:
        parent, name = paths.split(path)
        rows.append((parent, name, stat.S_IFDIR | 0o755, 0, now_ns, None, None, 0, 0))
    builder.add_entries(rows)


def empty_root(
    storage: ObjectSink, compressor: zstandard.ZstdCompressor, now_ns: int
) -> StoredCatalog:
    """A root catalog holding only the directory `/` (what `repo-server init` starts with)."""
    builder = CatalogBuilder("/")
    builder.add_entries([("", "", stat.S_IFDIR | 0o755, 0, now_ns, None, None, 0, 0)])
    return builder.finish(storage, compressor)


def prune(
    storage: ObjectSink,
    load: LoadCatalog,
    root: ObjectRef,
    path: str,
    compressor: zstandard.ZstdCompressor,
) -> StoredCatalog | None:
    """The new root catalog without path and everything below it (a removal), rewriting
    only the catalogs from the root to the one holding path's entry; None if nothing is
    at path. `/` itself is not pruned: a removal of everything publishes empty_root."""
    data = load(root)
    catalog = Catalog.from_bytes(data, root.digest)
    try:
        inner = catalog.nested_for(paths.split(path)[0])
        builder = CatalogBuilder.from_catalog(catalog, data)
    finally:
        catalog.close()
    if inner is not None:
        nested = ObjectRef.catalog(inner.hash, inner.size)
        child = prune(storage, load, nested, path, compressor)
        if child is None:
            return None
        builder.add_nested(NestedRef(inner.path, child.hash, child.size, child.stats))
    elif builder.entry_mode(path) is None:
        return None
    else:
        builder.remove_subtree(path)
    return builder.finish(storage, compressor)


def extract(
    storage: ObjectSink,
    load: LoadCatalog,
    root: ObjectRef,
    path: str,
    compressor: zstandard.ZstdCompressor,
) -> Subtree | None:
    """The directory at path in the tree of root as a Subtree to graft (a rollback of
    one path); None if nothing is at path. A directory that is a catalog root is reused
    as it is; otherwise a catalog rooted at path is written from its rows."""
    ref = root
    while True:
        data = load(ref)
        catalog = Catalog.from_bytes(data, ref.digest)
        try:
            inner = catalog.nested_for(paths.split(path)[0])
            if inner is None:
                entry = catalog.entry(path)
                own = catalog.nested.get(path)
                break
        finally:
            catalog.close()
        ref = ObjectRef.catalog(inner.hash, inner.size)
    if entry is None:
        return None
    if not stat.S_ISDIR(entry.mode):
        raise PathConflict(f"{path} is not a directory there; give the directory holding it")
    if own is not None:
        return Subtree(
            path, StoredCatalog(own.hash, own.size, own.stats, 0), entry.mode, entry.mtime_ns
        )
    source = sqlite3.connect(":memory:")
    try:
        source.deserialize(data)
        below = path + "/"
        n = len(below)
        builder = CatalogBuilder(path)
        builder.add_entries(
            source.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = ? OR substr(parent, 1, ?) = ?",
                (path, n, below),
            ).fetchall()
        )
        builder.add_chunks(
            source.execute(
                "SELECT path, offset, size, hash FROM chunks WHERE substr(path, 1, ?) = ?",
                (n, below),
            ).fetchall()
        )
        for row in source.execute(
            "SELECT path, hash, size, files, dirs, symlinks, bytes, catalogs FROM nested "
            "WHERE substr(path, 1, ?) = ?",
            (n, below),
        ).fetchall():
            builder.add_nested(NestedRef(row[0], row[1], row[2], TreeStats(*row[3:])))
    finally:
        source.close()
    return Subtree(path, builder.finish(storage, compressor), entry.mode, entry.mtime_ns)
