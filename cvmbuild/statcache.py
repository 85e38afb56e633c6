"""The publisher's memory of the last publish: file stat → objects, catalog digest → object.

It lets an unchanged re-publish read no file content and rewrite no catalog. It is a
cache: losing it costs time, never correctness, because every reuse is checked
against the repository's storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from cvmbuild.ingest import FileContent
from cvmbuild.scan import SourceEntry
from cvmfs_format.catalog import Chunk, NestedRef, TreeStats
from cvmfs_format.durable import write_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    relpath TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
    ino INTEGER, hash TEXT, chunks TEXT
);
CREATE TABLE IF NOT EXISTS catalogs (
    digest TEXT PRIMARY KEY, path TEXT, hash TEXT, size INTEGER, stats TEXT
);
"""


def cache_dir() -> Path:
    env = os.environ.get("CVMBUILD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cvmbuild"


StatKey = tuple[int, int, int, int]
RACY_NS = 1_000_000_000  # more than any file system's timestamp granularity


def _stat_key(entry: SourceEntry) -> StatKey:
    return (entry.size, entry.mtime_ns, entry.ctime_ns, entry.ino)


class StatCache:
    def __init__(self, repo_id: str, prefix: str, src: str):
        key = hashlib.sha256(f"{repo_id}\0{prefix}\0{os.path.realpath(src)}".encode()).hexdigest()
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"statcache-{key[:24]}.sqlite"
        self.files: dict[str, tuple[StatKey, FileContent]] = {}
        self.catalogs: dict[str, NestedRef] = {}
        try:
            self._load()
        except (sqlite3.DatabaseError, ValueError, TypeError):
            self.files, self.catalogs = {}, {}  # a damaged cache is only a slower publish

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        db.executescript(SCHEMA)
        return db

    def _load(self) -> None:
        with self._connect() as db:
            for relpath, size, mtime, ctime, ino, digest, chunks in db.execute(
                "SELECT * FROM files"
            ):
                parsed = tuple(Chunk(*c) for c in json.loads(chunks)) if chunks else ()
                self.files[relpath] = ((size, mtime, ctime, ino), FileContent(digest, parsed))
            for digest, path, obj, size, stats in db.execute("SELECT * FROM catalogs"):
                self.catalogs[digest] = NestedRef(path, obj, size, TreeStats(*json.loads(stats)))
        db.close()

    def lookup(self, entry: SourceEntry) -> FileContent | None:
        hit = self.files.get(entry.relpath)
        if hit is not None and hit[0] == _stat_key(entry):
            return hit[1]
        return None

    def save(
        self,
        entries: list[SourceEntry],
        contents: dict[str, FileContent],
        catalogs: dict[str, NestedRef],
        *,
        written_since: int = 0,
        warn: Callable[[str], None] = print,
    ) -> None:
        """Replace the cache with this publish's state (skipped if nothing changed).

        A file whose mtime or ctime is not well before written_since (when the publish
        began, in ns) is left out: a write in the same clock tick as its read would
        leave its stat unchanged, and the next publish must read it again ("racy git").
        """
        racy_from = written_since - RACY_NS if written_since else None
        files: dict[str, tuple[StatKey, FileContent]] = {}
        for entry in entries:
            content = contents.get(entry.relpath)
            if content is None:
                continue
            if racy_from is not None and max(entry.mtime_ns, entry.ctime_ns) >= racy_from:
                continue
            files[entry.relpath] = (_stat_key(entry), content)
        if files == self.files and catalogs == self.catalogs:
            return
        rows = []
        for relpath, (key, content) in files.items():
            chunks = (
                json.dumps([[c.offset, c.size, c.hash] for c in content.chunks])
                if content.chunks
                else None
            )
            rows.append((relpath, *key, content.hash, chunks))
        db = sqlite3.connect(":memory:")
        db.executescript(SCHEMA)
        with db:
            db.executemany("INSERT INTO files VALUES (?,?,?,?,?,?,?)", rows)
            db.executemany(
                "INSERT INTO catalogs VALUES (?,?,?,?,?)",
                [
                    (d, r.path, r.hash, r.size, json.dumps(r.stats.as_row()))
                    for d, r in catalogs.items()
                ],
            )
        data = db.serialize()
        db.close()
        try:
            write_atomic(self.path, data)
        except OSError as exc:  # the publish is done; a cache only saves time
            warn(
                f"warning: cannot save the stat cache {self.path} ({exc.strerror}); "
                "the next publish reads every file again"
            )
