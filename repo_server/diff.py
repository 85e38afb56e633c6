"""`repo-server diff`: the paths added, removed and modified between two revisions.

Catalogs are expanded shallowest mountpoint first on both sides at once, so a nested
catalog whose hash is the same in both revisions is never read: a diff costs the
catalogs that changed, not the size of the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from cvmfs_format.catalog import Catalog
from cvmfs_format.objects import ObjectRef

ADDED = "+"
REMOVED = "-"
MODIFIED = "M"
KIND_NAMES = {ADDED: "added", REMOVED: "removed", MODIFIED: "modified"}  # for --json


class Change(NamedTuple):
    kind: str  # ADDED, REMOVED or MODIFIED
    path: str


# What makes two entries at one path the same: type and permission bits, size, content
# (object hash, or the chunk hashes of a chunked file) and symlink target. Times, hard
# link groups and where catalogs are split are not content, so a directory is modified
# only when its permissions change; changes inside it are listed as its children's.
Signature = tuple[int, int, str | None, str | None, tuple[str, ...]]


@dataclass
class _Side:
    """One revision's tree, loaded one catalog at a time."""

    load: Callable[[ObjectRef], Catalog]
    pending: dict[str, ObjectRef]  # mountpoint -> catalog, not loaded yet
    entries: dict[str, Signature] = field(default_factory=dict)

    def expand(self, mountpoint: str) -> None:
        catalog = self.load(self.pending.pop(mountpoint))
        try:
            for entry in catalog.all_entries():
                chunks = tuple(c.hash for c in catalog.chunks(entry.path)) if entry.chunked else ()
                self.entries[entry.path] = (
                    entry.mode,
                    entry.size,
                    entry.hash,
                    entry.target,
                    chunks,
                )
            for ref in catalog.nested.values():
                self.pending[ref.path] = ObjectRef.catalog(ref.hash, ref.size)
        finally:
            catalog.close()


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def diff_trees(
    load: Callable[[ObjectRef], Catalog], old_root: ObjectRef, new_root: ObjectRef
) -> list[Change]:
    """Changes from the tree of root catalog old_root to that of new_root, by path."""
    old, new = _Side(load, {"/": old_root}), _Side(load, {"/": new_root})
    while old.pending or new.pending:
        # A mountpoint at depth d is found only by loading a catalog above it, so once
        # every shallower catalog is loaded, both sides' mountpoints at d are known.
        depth = min(_depth(m) for m in (*old.pending, *new.pending))
        level = [m for m in old.pending if _depth(m) == depth]
        for mountpoint in level:
            if new.pending.get(mountpoint) == old.pending[mountpoint]:
                del old.pending[mountpoint], new.pending[mountpoint]
        for side in (old, new):
            for mountpoint in [m for m in side.pending if _depth(m) == depth]:
                side.expand(mountpoint)
    changes = [Change(REMOVED, p) for p in old.entries.keys() - new.entries.keys()]
    changes += [Change(ADDED, p) for p in new.entries.keys() - old.entries.keys()]
    changes += [
        Change(MODIFIED, p)
        for p in old.entries.keys() & new.entries.keys()
        if old.entries[p] != new.entries[p]
    ]
    return sorted(changes, key=lambda c: c.path)
