"""The history object: every revision's root catalog, who made it, and the named tags
(docs/FORMAT.md, "History")."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from cvmfs_format.errors import FormatError, NotFoundError

SCHEMA = """
CREATE TABLE revisions (
    revision INTEGER PRIMARY KEY,
    root TEXT NOT NULL,
    root_size INTEGER NOT NULL,
    published INTEGER NOT NULL,
    path TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE tags (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    created INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Who made each revision and what it changed. Histories written before it existed lack
# the table (or a revision's row): readers take that as "not recorded".
RECORDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    publisher TEXT NOT NULL,
    via TEXT NOT NULL,
    tool TEXT NOT NULL,
    added INTEGER NOT NULL,
    changed INTEGER NOT NULL,
    removed INTEGER NOT NULL
);
"""

_COLUMNS = "revision, root, root_size, published, path, message"
_RECORD_COLUMNS = "kind, publisher, via, tool, added, changed, removed"


@dataclass(frozen=True)
class RevisionRecord:
    revision: int
    root_hash: str
    root_size: int
    published: int
    path: str
    message: str
    # From the records table; None where the history does not say (docs/FORMAT.md).
    kind: str | None = None  # publish, remove, rollback, create
    publisher: str | None = None  # a token's name (via "api") or user@host ("local")
    via: str | None = None
    tool: str | None = None  # the publishing tool and its version
    added: int | None = None
    changed: int | None = None
    removed: int | None = None


@dataclass(frozen=True)
class Tag:
    name: str
    revision: int
    created: int


def record_row(
    revision: int,
    kind: str,
    publisher: str,
    via: str,
    tool: str,
    counts: tuple[int, int, int],
) -> tuple[object, ...]:
    """The records row a writer inserts (after `RECORDS_SCHEMA`)."""
    return (revision, kind, publisher, via, tool, *counts)


RECORD_INSERT = "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


class History:
    def __init__(self, data: bytes, digest: str):
        self.digest = digest
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            self._db.deserialize(data)
            self._db.execute("SELECT COUNT(*) FROM revisions").fetchone()
            self._select = self._query()
        except sqlite3.DatabaseError as exc:
            raise FormatError(f"history {digest}: not a valid history database ({exc})") from exc

    def _query(self) -> str:
        has_records = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
        ).fetchone()
        if not has_records:
            return f"SELECT {_COLUMNS} FROM revisions"
        self._db.execute(f"SELECT {_RECORD_COLUMNS} FROM records LIMIT 0")  # well-formed
        return (
            f"SELECT {', '.join('revisions.' + c for c in _COLUMNS.split(', '))}, "
            f"{_RECORD_COLUMNS} FROM revisions LEFT JOIN records USING (revision)"
        )

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db

    def revisions(self) -> list[RevisionRecord]:
        rows = self._db.execute(f"{self._select} ORDER BY revision").fetchall()
        return [_record(row) for row in rows]

    def revision(self, number: int) -> RevisionRecord:
        row = self._db.execute(f"{self._select} WHERE revision = ?", (number,)).fetchone()
        if row is None:
            raise NotFoundError(f"revision {number} is not in the repository's history")
        return _record(row)

    def tags(self) -> list[Tag]:
        rows = self._db.execute("SELECT name, revision, created FROM tags ORDER BY name")
        return [Tag(*row) for row in rows.fetchall()]

    def tag(self, name: str) -> Tag:
        row = self._db.execute(
            "SELECT name, revision, created FROM tags WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no tag named {name!r}")
        return Tag(*row)


def _record(row: tuple[object, ...]) -> RevisionRecord:
    return RevisionRecord(*row)  # type: ignore[arg-type]
