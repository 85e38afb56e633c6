"""`repo-server diff`: the paths added, removed and modified between two revisions.

Catalogs are expanded shallowest mountpoint first on both sides at once, so a nested
catalog whose hash is the same in both revisions is never read: a diff costs the
catalogs that changed, not the size of the tree.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from cvmfs_format.catalog import Catalog, TreeStats
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
    stats: dict[str, TreeStats] = field(default_factory=dict)  # of pending nested catalogs

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
                self.stats[ref.path] = ref.stats
        finally:
            catalog.close()


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


# Told of a subtree only one side has, instead of listing it: (kind, the mountpoint of
# its catalog, the totals of what is below the mountpoint).
OneSided = Callable[[str, str, TreeStats], None]


def _holds_below(side: _Side, mountpoint: str, paths_sorted: list[str]) -> bool:
    """Whether side has entries or catalogs strictly below mountpoint."""
    below = mountpoint.rstrip("/") + "/"
    at = bisect.bisect_left(paths_sorted, below)
    if at < len(paths_sorted) and paths_sorted[at].startswith(below):
        return True
    return any(p.startswith(below) for p in side.pending)


def diff_trees(
    load: Callable[[ObjectRef], Catalog],
    old_root: ObjectRef,
    new_root: ObjectRef,
    one_sided: OneSided | None = None,
) -> list[Change]:
    """Changes from the tree of root catalog old_root to that of new_root, by path.
    With one_sided, a nested catalog whose subtree the other side lacks entirely is
    reported there by its totals, unread (a new release costs no reading of its tree)."""
    old, new = _Side(load, {"/": old_root}), _Side(load, {"/": new_root})
    while old.pending or new.pending:
        # A mountpoint at depth d is found only by loading a catalog above it, so once
        # every shallower catalog is loaded, both sides' mountpoints at d are known.
        depth = min(_depth(m) for m in (*old.pending, *new.pending))
        level = [m for m in old.pending if _depth(m) == depth]
        for mountpoint in level:
            if new.pending.get(mountpoint) == old.pending[mountpoint]:
                del old.pending[mountpoint], new.pending[mountpoint]
        if one_sided is not None:
            for side, other, kind in ((old, new, REMOVED), (new, old, ADDED)):
                alone = [m for m in side.pending if _depth(m) == depth and m not in other.pending]
                known = sorted(other.entries) if alone else []
                for mountpoint in alone:
                    if not _holds_below(other, mountpoint, known):
                        one_sided(kind, mountpoint, side.stats[mountpoint])
                        del side.pending[mountpoint]
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
