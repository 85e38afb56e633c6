"""New revisions: a published subtree, a removed path, a path or the whole tree rolled
back. Each is built, compared with the head (changes.py), held to the rules that keep a
publish from destroying more than was meant, and recorded with who made it and what it
changed (docs/FORMAT.md, "History"; docs/PUBLISHING.md, "Replacing, removing, rolling
back"). The local commands and the publish API both come here.
"""

from __future__ import annotations

import functools
import getpass
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard

from cvmfs_format.catalog import Catalog, TreeStats
from cvmfs_format.catalog_writer import (
    LoadCatalog,
    StoredCatalog,
    Subtree,
    empty_root,
    extract,
    graft,
    prune,
)
from cvmfs_format.history import History
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import ObjectRef
from cvmfs_format.store import ObjectSink, Storage
from cvmfs_format.version import product_version
from repo_server.changes import Changes, name_paths, tree_changes
from repo_server.errors import Refused
from repo_server.loading import load_verified

if TYPE_CHECKING:
    from repo_server.repository import LocalRepository

PUBLISH, REMOVE, ROLLBACK = "publish", "remove", "rollback"


def tool(program: str) -> str:
    """How a revision names the tool that made it, e.g. `cvmbuild 0.1.0`."""
    return f"{program} {product_version()}"


@dataclass(frozen=True)
class Author:
    """Who makes a revision: a token's name over the publish API, user@host locally."""

    publisher: str
    via: str  # "api" or "local"
    tool: str

    @classmethod
    def local(cls, program: str) -> Author:
        return cls(f"{getpass.getuser()}@{socket.gethostname()}", "local", tool(program))


@dataclass(frozen=True)
class Intent:
    """What a new revision is asked to do, and what its asker allows."""

    kind: str  # PUBLISH, REMOVE or ROLLBACK
    path: str
    message: str = ""
    tag: str | None = None
    replace: bool = False  # a publish may remove paths below path the tree lacks
    force_tag: bool = False  # the tag may move from the revision it names
    everything: bool = False  # a removal of / may empty the repository
    dry_run: bool = False


@dataclass(frozen=True)
class NewRevision:
    revision: int  # the new revision's number (a dry run: what it would be)
    manifest: Manifest | None  # None for a dry run
    changes: Changes
    stats: TreeStats
    new_bytes: int  # stored bytes of the catalogs and history written for it
    # A dry run's findings that the real run would refuse (what to pass instead).
    refusals: tuple[str, ...] = ()


class ScratchSink:
    """Storage seen through a dry run: objects it puts stay in memory, readable by it.
    objects: what it holds from the start (a dry-run lease's uploads)."""

    def __init__(self, storage: Storage, objects: dict[str, bytes] | None = None):
        self.storage = storage
        self.objects: dict[str, bytes] = {} if objects is None else objects

    def has(self, digest: str) -> bool:
        return digest in self.objects or self.storage.has(digest)

    def missing(self, digests: Iterable[str]) -> set[str]:
        return {d for d in self.storage.missing(digests) if d not in self.objects}

    def put_object(self, digest: str, stored: bytes) -> bool:
        if self.has(digest):
            return False
        self.objects[digest] = stored
        return True

    def get_object(self, digest: str, max_bytes: int | None = None) -> bytes:
        stored = self.objects.get(digest)
        return self.storage.get_object(digest, max_bytes) if stored is None else stored

    def object_head(self, digest: str, length: int) -> tuple[bytes, int]:
        stored = self.objects.get(digest)
        if stored is None:
            return self.storage.object_head(digest, length)
        return stored[:length], len(stored)

    def load(self, ref: ObjectRef) -> bytes:
        stored = self.objects.get(ref.digest)
        return load_verified(self.storage, ref) if stored is None else ref.decode(stored)


# Builds the new root catalog from the head's: (sink, load, head root, compressor, now_ns).
BuildRoot = Callable[
    [ObjectSink, LoadCatalog, ObjectRef, zstandard.ZstdCompressor, int], StoredCatalog
]


def make_revision(
    repo: LocalRepository,
    intent: Intent,
    author: Author,
    build: BuildRoot,
    *,
    compressor: zstandard.ZstdCompressor | None = None,
    scratch: ScratchSink | None = None,
) -> NewRevision:
    """Build, check and (unless a dry run) publish one new revision (hold the lock).
    scratch: where a dry run's caller already put objects (a local dry-run publish's
    catalogs)."""
    compressor = compressor or zstandard.ZstdCompressor(level=3)
    head = repo.head()
    history = repo.history(head)
    now = time.time()
    sink: ObjectSink
    if intent.dry_run:
        scratch = scratch or ScratchSink(repo.storage)
        sink, load = scratch, scratch.load
    else:
        sink, load = repo.storage, functools.partial(load_verified, repo.storage)
    head_root = ObjectRef.catalog(head.root_hash, head.root_size)
    root = build(sink, load, head_root, compressor, int(now * 1e9))
    changes = tree_changes(
        lambda ref: Catalog.from_bytes(load(ref), ref.digest),
        head_root,
        ObjectRef.catalog(root.hash, root.size),
    )
    refusals = _refusals(intent, changes, history, head.revision + 1, root.hash)
    if intent.dry_run:
        return NewRevision(head.revision + 1, None, changes, root.stats, 0, refusals)
    if refusals:
        raise Refused(refusals[0])
    record = (intent.kind, author.publisher, author.via, author.tool, changes.counts)
    manifest, history_bytes = repo.publish_root(
        head, root.hash, root.size, intent.path, intent.message, intent.tag, compressor, now, record
    )
    return NewRevision(
        manifest.revision, manifest, changes, root.stats, root.new_bytes + history_bytes
    )


def _refusals(
    intent: Intent, changes: Changes, history: History, revision: int, root_hash: str
) -> tuple[str, ...]:
    found = []
    if intent.kind == ROLLBACK and changes.counts == (0, 0, 0):
        found.append(f"{intent.path} holds that content already; nothing to roll back")
    if intent.kind == PUBLISH and changes.removed and not intent.replace:
        n = changes.removed
        found.append(
            f"publishing at {intent.path} would remove {n} {'path' if n == 1 else 'paths'} "
            f"that the tree does not hold ({name_paths(changes.top_removed, n)}); "
            "publish at the release's own path, or pass --replace to replace them"
        )
    if intent.tag is not None and not intent.force_tag:
        named = {t.name: t.revision for t in history.tags()}.get(intent.tag)
        # Naming the same tree again (a build run twice) moves nothing anyone can see.
        if named is not None and history.revision(named).root_hash != root_hash:
            found.append(
                f"tag {intent.tag!r} already names revision {named}; pass --force-tag to "
                f"move it to revision {revision}"
            )
    return tuple(found)


def publish_subtree(
    repo: LocalRepository,
    subtree: Subtree,
    intent: Intent,
    author: Author,
    *,
    compressor: zstandard.ZstdCompressor | None = None,
    scratch: ScratchSink | None = None,
) -> NewRevision:
    """subtree in place of whatever was at its path."""

    def build(
        sink: ObjectSink,
        load: LoadCatalog,
        root: ObjectRef,
        compressor: zstandard.ZstdCompressor,
        now_ns: int,
    ) -> StoredCatalog:
        return graft(sink, load, root, subtree, compressor, now_ns)

    return make_revision(repo, intent, author, build, compressor=compressor, scratch=scratch)


def remove_path(
    repo: LocalRepository, intent: Intent, author: Author, *, scratch: ScratchSink | None = None
) -> NewRevision:
    """A new revision without intent.path and everything below it."""

    def build(
        sink: ObjectSink,
        load: LoadCatalog,
        root: ObjectRef,
        compressor: zstandard.ZstdCompressor,
        now_ns: int,
    ) -> StoredCatalog:
        if intent.path == "/":
            if not intent.everything:
                raise Refused(
                    "removing / would empty the whole repository; pass --everything if "
                    "that is what you mean"
                )
            return empty_root(sink, compressor, now_ns)
        pruned = prune(sink, load, root, intent.path, compressor)
        if pruned is None:
            raise Refused(f"nothing at {intent.path} to remove (see `cvmfs-client ls`)")
        return pruned

    return make_revision(repo, intent, author, build, scratch=scratch)


def rollback_path(
    repo: LocalRepository,
    intent: Intent,
    author: Author,
    target: ObjectRef,
    revision: int,
    *,
    scratch: ScratchSink | None = None,
) -> NewRevision:
    """A new revision whose intent.path holds what it held in `revision` (root catalog
    target); for `/`, the whole tree of that revision. Nothing older is modified."""

    def build(
        sink: ObjectSink,
        load: LoadCatalog,
        root: ObjectRef,
        compressor: zstandard.ZstdCompressor,
        now_ns: int,
    ) -> StoredCatalog:
        if intent.path == "/":
            catalog = Catalog.from_bytes(load(target), target.digest)
            try:
                return StoredCatalog(target.digest, target.size, catalog.stats(), 0)
            finally:
                catalog.close()
        old = extract(sink, load, target, intent.path, compressor)
        if old is not None:
            return graft(sink, load, root, old, compressor, now_ns)
        pruned = prune(sink, load, root, intent.path, compressor)
        if pruned is None:
            raise Refused(f"{intent.path} exists neither now nor in revision {revision}")
        return pruned

    return make_revision(repo, intent, author, build, scratch=scratch)
