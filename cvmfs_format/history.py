"""The history object: every revision's root catalog and the named tags (docs/FORMAT.md)."""

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


@dataclass(frozen=True)
class RevisionRecord:
    revision: int
    root_hash: str
    root_size: int
    published: int
    path: str
    message: str


@dataclass(frozen=True)
class Tag:
    name: str
    revision: int
    created: int


class History:
    def __init__(self, data: bytes, digest: str):
        self.digest = digest
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            self._db.deserialize(data)
            self._db.execute("SELECT COUNT(*) FROM revisions").fetchone()
        except sqlite3.DatabaseError as exc:
            raise FormatError(f"history {digest}: not a valid history database ({exc})") from exc

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db

    def revisions(self) -> list[RevisionRecord]:
        rows = self._db.execute(
            "SELECT revision, root, root_size, published, path, message FROM revisions "
            "ORDER BY revision"
        ).fetchall()
        return [RevisionRecord(*row) for row in rows]

    def revision(self, number: int) -> RevisionRecord:
        row = self._db.execute(
            "SELECT revision, root, root_size, published, path, message FROM revisions "
            "WHERE revision = ?",
            (number,),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"revision {number} is not in the repository's history")
        return RevisionRecord(*row)

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
