"""Catalogs: SQLite databases listing a subtree's entries (docs/FORMAT.md, "Catalogs")."""

from __future__ import annotations

import sqlite3
import stat
import threading
from dataclasses import dataclass
from typing import NamedTuple

from cvmfs_format import paths
from cvmfs_format.catalog_rules import (
    FLAG_CHUNKED,
    FLAG_NESTED_ROOT,
    SCHEMA_VERSION,
    check_chunk_list,
    check_chunk_row,
    check_nested_row,
    check_properties,
    entry_error,
    entry_problem,
)
from cvmfs_format.errors import FormatError

__all__ = [  # the rules' names that readers and writers import from here
    "FLAG_CHUNKED",
    "FLAG_NESTED_ROOT",
    "SCHEMA_VERSION",
    "check_chunk_list",
]

SCHEMA = """
CREATE TABLE properties (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT,
    target TEXT,
    link_group INTEGER NOT NULL DEFAULT 0,
    flags INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE TABLE chunks (
    path TEXT NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (path, offset)
) WITHOUT ROWID;
CREATE TABLE nested (
    path TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    files INTEGER NOT NULL,
    dirs INTEGER NOT NULL,
    symlinks INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    catalogs INTEGER NOT NULL
) WITHOUT ROWID;
"""

ENTRY_COLUMNS = "parent, name, mode, size, mtime_ns, hash, target, link_group, flags"


@dataclass(frozen=True)
class TreeStats:
    """Totals of a subtree, nested catalogs included."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    catalogs: int = 1

    def __add__(self, other: TreeStats) -> TreeStats:
        return TreeStats(
            self.files + other.files,
            self.dirs + other.dirs,
            self.symlinks + other.symlinks,
            self.bytes + other.bytes,
            self.catalogs + other.catalogs,
        )

    def as_row(self) -> tuple[int, int, int, int, int]:
        return (self.files, self.dirs, self.symlinks, self.bytes, self.catalogs)


@dataclass(frozen=True)
class Chunk:
    offset: int
    size: int
    hash: str


@dataclass(frozen=True)
class NestedRef:
    path: str
    hash: str
    size: int  # stored bytes of the catalog object
    stats: TreeStats


class Entry(NamedTuple):
    """One catalog row. A tuple, because a cold directory walk builds thousands."""

    path: str
    mode: int
    size: int
    mtime_ns: int
    hash: str | None
    target: str | None
    link_group: int
    flags: int

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def chunked(self) -> bool:
        return bool(self.flags & FLAG_CHUNKED)


def entry_from_row(row: tuple) -> Entry:  # type: ignore[type-arg]
    """The entry of one catalog row, which must follow the rules (catalog_rules)."""
    problem = entry_problem(row)
    if problem is not None:
        raise entry_error(row, problem)
    parent, name, mode, size, mtime_ns, digest, target, link_group, flags = row
    return Entry(paths.join(parent, name), mode, size, mtime_ns, digest, target, link_group, flags)


class Catalog:
    """Read access to one catalog; thread-safe, as FUSE calls come from many threads."""

    def __init__(self, connection: sqlite3.Connection, digest: str):
        self.digest = digest
        self._db = connection
        self._lock = threading.Lock()
        self._link_counts: dict[int, int] | None = None
        props = dict(self._query("SELECT key, value FROM properties"))
        self.root, counts = check_properties(props, digest)
        self.properties = props
        self._stats = TreeStats(*counts)
        self.nested: dict[str, NestedRef] = {}
        for row in self._query(
            "SELECT path, hash, size, files, dirs, symlinks, bytes, catalogs FROM nested"
        ):
            check_nested_row(row, self.root, digest)
            self.nested[row[0]] = NestedRef(row[0], row[1], row[2], TreeStats(*row[3:]))

    @classmethod
    def from_bytes(cls, data: bytes, digest: str) -> Catalog:
        db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            db.deserialize(data)
            return cls(db, digest)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise FormatError(f"catalog {digest}: not a valid SQLite catalog ({exc})") from exc

    @classmethod
    def from_file(cls, filename: str, digest: str) -> Catalog:
        try:
            db = sqlite3.connect(
                f"file:{filename}?mode=ro&immutable=1", uri=True, check_same_thread=False
            )
            return cls(db, digest)
        except sqlite3.DatabaseError as exc:
            raise FormatError(f"catalog {digest}: not a valid SQLite catalog ({exc})") from exc

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise FormatError(f"catalog {self.digest}: {exc}") from exc

    def stats(self) -> TreeStats:
        return self._stats

    def entry(self, path: str) -> Entry | None:
        parent, name = paths.split(path)
        rows = self._query(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = ? AND name = ?", (parent, name)
        )
        return entry_from_row(rows[0]) if rows else None

    def children(self, dirpath: str) -> list[Entry]:
        rows = self._query(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = ? ORDER BY name", (dirpath,)
        )
        return [entry_from_row(row) for row in rows]

    def all_entries(self) -> list[Entry]:
        rows = self._query(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY parent, name")
        return [entry_from_row(row) for row in rows]

    def chunks(self, path: str) -> list[Chunk]:
        rows = self._query(
            "SELECT offset, size, hash FROM chunks WHERE path = ? ORDER BY offset", (path,)
        )
        for row in rows:
            check_chunk_row(path, row)
        return [Chunk(*row) for row in rows]

    def entry_rows(self) -> list[tuple]:  # type: ignore[type-arg]
        """Every entries row as stored, unchecked (for catalog_rules.validate_catalog)."""
        return self._query(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY parent, name")

    def chunk_rows(self) -> list[tuple]:  # type: ignore[type-arg]
        """Every chunks row (path, offset, size, hash) as stored, unchecked."""
        return self._query("SELECT path, offset, size, hash FROM chunks ORDER BY path, offset")

    def link_count(self, group: int) -> int:
        if self._link_counts is None:  # one query for every group, on first use
            rows = self._query(
                "SELECT link_group, COUNT(*) FROM entries WHERE link_group != 0 GROUP BY link_group"
            )
            self._link_counts = {int(g): int(n) for g, n in rows}
        return self._link_counts.get(group, 0)

    def nested_for(self, dirpath: str) -> NestedRef | None:
        """The nested catalog that holds the children of dirpath, if not this one."""
        for candidate in [*paths.ancestors(dirpath), dirpath]:
            if candidate in self.nested and paths.is_within(candidate, self.root):
                return self.nested[candidate]
        return None

    def close(self) -> None:
        with self._lock:
            self._db.close()
