"""A repository on storage: creation, the verified head, the publish lock and commits.

A commit stores the new root catalog and history, makes every object durable, and
only then replaces the manifest by an atomic rename (docs/FORMAT.md, "Publishing").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cvmfs_client import manifest as manifest_mod
from cvmfs_client import whitelist as whitelist_mod
from cvmfs_client.catalog import TreeStats
from cvmfs_client.history import SCHEMA as HISTORY_SCHEMA
from cvmfs_client.history import History
from cvmfs_client.manifest import Manifest
from cvmfs_client.objects import content_hash, decode_object, encode_object
from cvmfs_client.repository import MANIFEST_FILE, WHITELIST_FILE
from cvmfs_client.signed import attach_signature, encode_public_key, key_fingerprint
from cvmfs_client.whitelist import Whitelist
from repo_server import keys
from repo_server.catalog_writer import CatalogBuilder, CatalogLoader, Subtree, graft
from repo_server.errors import RepoError
from repo_server.storage import LocalStorage

DAY = 86400
WHITELIST_DAYS = 30
MANIFEST_DAYS = 30
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class CommitResult:
    manifest: Manifest
    stats: TreeStats
    new_bytes: int


class LocalRepository:
    def __init__(self, root: Path, keydir: Path | None = None):
        self.root = Path(root).resolve()
        if not (self.root / MANIFEST_FILE).is_file():
            raise RepoError(
                f"{root}: not a repository (no manifest; create one with `repo-server init`)"
            )
        self.keydir = Path(keydir) if keydir else keys.default_keydir(self.root)
        self.storage = LocalStorage(self.root)
        self._head: Manifest | None = None

    # -- creation -------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, name: str, keydir: Path | None = None) -> LocalRepository:
        root = Path(root).resolve()
        keydir = (Path(keydir) if keydir else keys.default_keydir(root)).resolve()
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise RepoError(f"repository name {name!r}: use letters, digits, '-', '_' and '.'")
        if keydir == root or root in keydir.parents:
            raise RepoError(f"{keydir}: the key directory may not be inside the served directory")
        if root.exists() and any(root.iterdir()):
            raise RepoError(f"{root}: exists and is not empty")
        files = keys.KeyFiles(keydir, name)
        for path in (files.master, files.signing, files.public):
            if path.exists():
                raise RepoError(f"{path}: already exists; refusing to overwrite a key")
        keydir.mkdir(parents=True, exist_ok=True, mode=0o700)
        master = Ed25519PrivateKey.generate()
        signing = Ed25519PrivateKey.generate()
        keys.write_private_key(files.master, master)
        keys.write_private_key(files.signing, signing)
        keys.write_public_key(files.public, master)
        storage = LocalStorage(root)
        storage.create_layout()
        now = int(time.time())
        _write_whitelist(storage, name, master, [signing], now)
        compressor = zstandard.ZstdCompressor(level=3)
        empty = CatalogBuilder("/")
        empty.add_entries([("", "", 0o040755, 0, now * 10**9, None, None, 0, 0)])
        catalog = empty.finish(storage, compressor)
        history = _new_history()
        history.execute(
            "INSERT INTO revisions VALUES (0, ?, ?, ?, '/', 'repository created')",
            (catalog.hash, catalog.size, now),
        )
        hist_hash, hist_size = _store_history(storage, history, compressor)
        manifest = Manifest(
            name,
            0,
            catalog.hash,
            catalog.size,
            hist_hash,
            hist_size,
            now,
            now + MANIFEST_DAYS * DAY,
            manifest_mod.DEFAULT_TTL,
            key_fingerprint(signing.public_key()),
        )
        storage.sync()
        storage.write_file(
            MANIFEST_FILE, attach_signature(manifest.body(), signing.sign(manifest.body()))
        )
        return cls(root, keydir)

    # -- reading --------------------------------------------------------------------

    def whitelist(self) -> Whitelist:
        data = self.storage.read_file(WHITELIST_FILE)
        if data is None:
            raise RepoError(f"{self.root}: whitelist missing")
        return whitelist_mod.parse(data)[0]

    def key_files(self) -> keys.KeyFiles:
        return keys.KeyFiles(self.keydir, self.whitelist().name)

    def head(self) -> Manifest:
        """The current manifest, verified with the pinned master key like a client would."""
        wl_data = self.storage.read_file(WHITELIST_FILE) or b""
        master = keys.load_public_key(self.key_files().public)
        whitelist = whitelist_mod.verify(wl_data, master, time.time())
        data = self.storage.read_file(MANIFEST_FILE) or b""
        return manifest_mod.verify(data, whitelist, time.time())

    def head_unverified(self) -> Manifest:
        return manifest_mod.parse(self.storage.read_file(MANIFEST_FILE) or b"")[0]

    def history(self, manifest: Manifest) -> History:
        data = decode_object(self.storage.get_object(manifest.history_hash), manifest.history_hash)
        return History(data, manifest.history_hash)

    # -- writing --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait_message: bool = True) -> Iterator[None]:
        """Serialise publishes; says so once on stderr while it waits."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    print(
                        f"waiting for another publish to {self.root} to finish...",
                        file=sys.stderr,
                        flush=True,
                    )
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.storage.begin_writes()
            yield
            self.storage.end_writes()  # not reached if the publish failed or was killed
        finally:
            os.close(fd)

    def commit(
        self,
        subtree: Subtree,
        *,
        message: str = "",
        tag: str | None = None,
        compressor: zstandard.ZstdCompressor | None = None,
    ) -> CommitResult:
        """Graft subtree into the head revision and publish the result (hold the lock)."""
        compressor = compressor or zstandard.ZstdCompressor(level=3)
        head = self.head()
        now = time.time()
        root = graft(
            self.storage,
            CatalogLoader(self.storage),
            (head.root_hash, head.root_size),
            subtree,
            compressor,
            int(now * 1e9),
        )
        revision = head.revision + 1
        history_db = _load_history(self.history(head))
        history_db.execute(
            "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
            (revision, root.hash, root.size, int(now), subtree.path, message),
        )
        if tag is not None:
            validate_tag(tag)
            history_db.execute(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (tag, revision, int(now))
            )
        hist_hash, hist_size = _store_history(self.storage, history_db, compressor)
        manifest = self._sign_manifest(
            head, revision, root.hash, root.size, hist_hash, hist_size, now
        )
        return CommitResult(manifest, root.stats, root.new_bytes)

    def _sign_manifest(
        self,
        head: Manifest,
        revision: int,
        root_hash: str,
        root_size: int,
        hist_hash: str,
        hist_size: int,
        now: float,
    ) -> Manifest:
        signing = keys.load_private_key(self.key_files().signing)
        manifest = Manifest(
            head.name,
            revision,
            root_hash,
            root_size,
            hist_hash,
            hist_size,
            int(now),
            int(now) + MANIFEST_DAYS * DAY,
            head.ttl,
            key_fingerprint(signing.public_key()),
        )
        body = manifest.body()
        self.storage.sync()  # everything the manifest names is durable before it appears
        self.storage.write_file(MANIFEST_FILE, attach_signature(body, signing.sign(body)))
        return manifest

    def resign(self) -> Manifest:
        """Re-sign the head with a fresh expiry, same revision and content."""
        head = self.head_unverified()
        return self._sign_manifest(
            head,
            head.revision,
            head.root_hash,
            head.root_size,
            head.history_hash,
            head.history_size,
            time.time(),
        )

    def renew_whitelist(self, days: int = WHITELIST_DAYS) -> Whitelist:
        files = self.key_files()
        master = keys.load_private_key(files.master)
        signing = keys.load_private_key(files.signing)
        return _write_whitelist(self.storage, files.name, master, [signing], int(time.time()), days)


def open_repository(location: str, keydir: Path | None = None) -> LocalRepository:
    """The repository a command names: a local directory (the S3 backend plugs in here)."""
    return LocalRepository(Path(location), keydir)


def validate_tag(name: str) -> None:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.+@" for c in name):
        raise RepoError(f"tag {name!r}: use up to 128 letters, digits and '-_.+@'")


def _write_whitelist(
    storage: LocalStorage,
    name: str,
    master: Ed25519PrivateKey,
    signing_keys: list[Ed25519PrivateKey],
    now: int,
    days: int = WHITELIST_DAYS,
) -> Whitelist:
    whitelist = Whitelist(
        name,
        now,
        now + days * DAY,
        tuple(encode_public_key(k.public_key()) for k in signing_keys),
    )
    body = whitelist.body()
    storage.write_file(WHITELIST_FILE, attach_signature(body, master.sign(body)))
    return whitelist


def _new_history() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(HISTORY_SCHEMA)
    return db


def _load_history(history: History) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.deserialize(history.connection.serialize())
    return db


def _store_history(
    storage: LocalStorage, db: sqlite3.Connection, compressor: zstandard.ZstdCompressor
) -> tuple[str, int]:
    db.commit()
    content = db.serialize()
    digest = content_hash(content)
    stored = encode_object(content, compressor)
    storage.put_object(digest, stored)
    return digest, len(stored)
