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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cvmfs_client.network import check_location
from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.catalog import TreeStats
from cvmfs_format.catalog_writer import Subtree, empty_root
from cvmfs_format.history import RECORD_INSERT, RECORDS_SCHEMA, History, record_row
from cvmfs_format.history import SCHEMA as HISTORY_SCHEMA
from cvmfs_format.manifest import MANIFEST_FILE, Manifest
from cvmfs_format.objects import content_hash, encode_object
from cvmfs_format.signed import attach_signature, encode_public_key, key_fingerprint
from cvmfs_format.store import Storage
from cvmfs_format.trust import TrustedState
from cvmfs_format.whitelist import WHITELIST_FILE, Whitelist
from repo_server import keys, revisions
from repo_server.errors import RepoError
from repo_server.pinned import ReadsHead, read_trusted
from repo_server.s3_storage import S3Storage, is_s3_location
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


class LocalRepository(ReadsHead):
    """A repository in a local directory, or (open_repository) on another Storage."""

    def __init__(
        self,
        root: Path | str,
        keydir: Path | None = None,
        *,
        storage: Storage | None = None,
        lock_file: Path | None = None,
    ):
        """The repository in directory root; or, given storage, the one on it that root
        names (e.g. s3://bucket/prefix), its keys in keydir, publishes locked by an
        flock on lock_file."""
        self._root: Path | None = None
        if storage is None:
            self._root = Path(root).resolve()
            storage = LocalStorage(self._root)
            keydir = keydir or keys.default_keydir(self._root)
            lock_file = self._root / LOCK_FILE
        if keydir is None or lock_file is None:
            raise RepoError(f"{root}: give the key directory (--keys KEYDIR)")
        self.location = str(self._root or root)
        self.keydir = Path(keydir)
        self.storage: Storage = storage
        self.lock_file = lock_file
        if storage.read_file(MANIFEST_FILE) is None:
            raise RepoError(
                f"{root}: not a repository (no manifest; create one with `repo-server init`)"
            )
        self._head: Manifest | None = None

    @property
    def root(self) -> Path:
        """The repository's directory, for what needs one (serving it, mirroring it)."""
        if self._root is None:
            raise RepoError(
                f"{self.location}: not a local directory; clients read a repository on S3 "
                "from the bucket's HTTP endpoint"
            )
        return self._root

    # -- creation -------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, name: str, keydir: Path | None = None) -> LocalRepository:
        root = Path(root).resolve()
        keydir = (Path(keydir) if keydir else keys.default_keydir(root)).resolve()
        _validate_name(name)
        if keydir == root or root in keydir.parents:
            raise RepoError(f"{keydir}: the key directory may not be inside the served directory")
        if root.exists() and any(root.iterdir()):
            raise RepoError(f"{root}: exists and is not empty")
        storage = LocalStorage(root)
        _create(storage, name, keydir, storage.create_layout)
        return cls(root, keydir)

    @classmethod
    def on_s3(cls, storage: S3Storage, keydir: Path) -> LocalRepository:
        """The repository under an S3 prefix. Its publish lock is a local file beside
        the keys: one host publishes (docs/OPERATING.md, "Repositories on S3")."""
        parts = ["s3", storage.bucket, *storage.prefix.split("/")]
        lock_file = keydir / ("-".join(p for p in parts if p) + ".lock")
        return cls(storage.location, keydir, storage=storage, lock_file=lock_file)

    # -- reading --------------------------------------------------------------------

    def whitelist(self) -> Whitelist:
        data = self.storage.read_file(WHITELIST_FILE)
        if data is None:
            raise RepoError(f"{self.location}: whitelist missing")
        return whitelist_mod.parse(data)[0]

    def key_files(self) -> keys.KeyFiles:
        return keys.KeyFiles(self.keydir, self.whitelist().name)

    def trust(self) -> TrustedState:
        """Whitelist and manifest accepted as a client accepts them: the master public key
        of the key directory and the repository's name pinned."""
        files = self.key_files()
        return read_trusted(
            self.storage, keys.load_public_key(files.public), files.name, time.time()
        )

    # -- writing --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait_message: bool = True) -> Iterator[None]:
        """Serialise publishes; says so once on stderr while it waits."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    print(
                        f"waiting for another publish to {self.location} to finish...",
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
        replace: bool = False,
        force_tag: bool = False,
    ) -> CommitResult:
        """Graft subtree into the head revision and publish the result (hold the lock),
        recorded as a local publish (repo_server.revisions has the rules)."""
        intent = revisions.Intent(
            revisions.PUBLISH, subtree.path, message, tag, replace=replace, force_tag=force_tag
        )
        new = revisions.publish_subtree(
            self, subtree, intent, revisions.Author.local("cvmbuild"), compressor=compressor
        )
        assert new.manifest is not None
        return CommitResult(new.manifest, new.stats, new.new_bytes)

    def publish_root(
        self,
        head: Manifest,
        root_hash: str,
        root_size: int,
        path: str,
        message: str,
        tag: str | None,
        compressor: zstandard.ZstdCompressor,
        now: float,
        record: tuple[str, str, str, str, tuple[int, int, int]] | None = None,
    ) -> tuple[Manifest, int]:
        """Publish root as the revision after head, with its history row, tag and
        record (kind, publisher, via, tool, counts: docs/FORMAT.md, "History"); hold
        the lock. Returns the manifest and the stored bytes of the new history."""
        revision = head.revision + 1
        if tag is not None:
            validate_tag(tag)

        def add_revision(history_db: sqlite3.Connection) -> None:
            history_db.execute(
                "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
                (revision, root_hash, root_size, int(now), path, message),
            )
            if record is not None:
                history_db.executescript(RECORDS_SCHEMA)
                history_db.execute(RECORD_INSERT, record_row(revision, *record))
            if tag is not None:
                history_db.execute(
                    "INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (tag, revision, int(now))
                )

        written: list[int] = []
        manifest = self._sign_with_history(
            head, revision, root_hash, root_size, add_revision, compressor, now, written
        )
        return manifest, written[0]

    def rewrite_history(self, edit: Callable[[sqlite3.Connection], None]) -> Manifest:
        """Store the head's history as `edit` changes it and re-sign the head with it:
        same revision, same root (hold the lock). Tags and gc change the history so."""
        head = self.head()
        compressor = zstandard.ZstdCompressor(level=3)
        return self._sign_with_history(
            head, head.revision, head.root_hash, head.root_size, edit, compressor, time.time()
        )

    def _sign_with_history(
        self,
        head: Manifest,
        revision: int,
        root_hash: str,
        root_size: int,
        edit: Callable[[sqlite3.Connection], None],
        compressor: zstandard.ZstdCompressor,
        now: float,
        written: list[int] | None = None,
    ) -> Manifest:
        history_db = _load_history(self.history(head))
        edit(history_db)
        hist_hash, hist_size = _store_history(self.storage, history_db, compressor)
        if written is not None:
            written.append(hist_size)
        return self._sign_manifest(head, revision, root_hash, root_size, hist_hash, hist_size, now)

    def _sign_manifest(
        self,
        head: Manifest,
        revision: int,
        root_hash: str,
        root_size: int,
        hist_hash: str,
        hist_size: int,
        now: float,
        signing: Ed25519PrivateKey | None = None,
    ) -> Manifest:
        signing = signing or keys.load_private_key(self.key_files().signing)
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

    def resign(self, signing: Ed25519PrivateKey | None = None) -> Manifest:
        """Re-sign the head with a fresh expiry, same revision and content, with the
        signing key (or, for a key rotation, with `signing`)."""
        head = self.head_unverified()
        return self._sign_manifest(
            head,
            head.revision,
            head.root_hash,
            head.root_size,
            head.history_hash,
            head.history_size,
            time.time(),
            signing,
        )


def open_repository(
    location: str, keydir: Path | None = None, endpoint_url: str | None = None
) -> LocalRepository:
    """The repository a command names: a local directory, or s3://BUCKET[/PREFIX] at
    endpoint_url (default: AWS_ENDPOINT_URL, else AWS)."""
    check_location(location, urls=False, s3=True)
    if not is_s3_location(location):
        return LocalRepository(Path(location), keydir)
    storage = S3Storage.from_location(location, endpoint_url)
    return LocalRepository.on_s3(storage, _s3_keydir(location, keydir))


def init_repository(
    location: str, name: str, keydir: Path | None = None, endpoint_url: str | None = None
) -> LocalRepository:
    """Create the repository a command names (see open_repository) with new keys."""
    check_location(location, urls=False, s3=True)
    if not is_s3_location(location):
        return LocalRepository.init(Path(location), name, keydir)
    storage = S3Storage.from_location(location, endpoint_url)
    keydir = _s3_keydir(location, keydir).resolve()
    _validate_name(name)
    if not storage.is_empty():
        raise RepoError(f"{location}: holds files already; choose an empty bucket or prefix")
    _create(storage, name, keydir, lambda: None)
    return LocalRepository.on_s3(storage, keydir)


def _s3_keydir(location: str, keydir: Path | None) -> Path:
    if keydir is None:
        raise RepoError(
            f"{location}: give the key directory with --keys KEYDIR (a repository on S3 "
            "keeps its keys and publish lock on the publishing host)"
        )
    return Path(keydir)


def _validate_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise RepoError(f"repository name {name!r}: use letters, digits, '-', '_' and '.'")


def _create(storage: Storage, name: str, keydir: Path, make_layout: Callable[[], None]) -> None:
    """New keys in keydir and revision 0 (an empty root) on storage."""
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
    make_layout()
    now = int(time.time())
    write_whitelist(storage, name, master, [signing.public_key()], now)
    compressor = zstandard.ZstdCompressor(level=3)
    catalog = empty_root(storage, compressor, now * 10**9)
    history = _new_history()
    history.execute(
        "INSERT INTO revisions VALUES (0, ?, ?, ?, '/', 'repository created')",
        (catalog.hash, catalog.size, now),
    )
    history.executescript(RECORDS_SCHEMA)
    creator = revisions.Author.local("repo-server")
    record = ("create", creator.publisher, creator.via, creator.tool, (0, 0, 0))
    history.execute(RECORD_INSERT, record_row(0, *record))
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


def validate_tag(name: str) -> None:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.+@" for c in name):
        raise RepoError(f"tag {name!r}: use up to 128 letters, digits and '-_.+@'")


def write_whitelist(
    storage: Storage,
    name: str,
    master: Ed25519PrivateKey,
    signing_keys: Sequence[Ed25519PublicKey],
    now: int,
    days: int = WHITELIST_DAYS,
) -> Whitelist:
    whitelist = Whitelist(
        name, now, now + days * DAY, tuple(encode_public_key(k) for k in signing_keys)
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
    storage: Storage, db: sqlite3.Connection, compressor: zstandard.ZstdCompressor
) -> tuple[str, int]:
    db.commit()
    content = db.serialize()
    digest = content_hash(content)
    stored = encode_object(content, compressor)
    storage.put_object(digest, stored)
    return digest, len(stored)
