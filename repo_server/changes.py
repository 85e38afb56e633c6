"""What a new revision changes: paths added, changed and removed, counted and named by
their top paths, for dry runs, refusals and the revision's record (docs/PUBLISHING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cvmfs_format import paths
from cvmfs_format.catalog import Catalog, TreeStats
from cvmfs_format.objects import ObjectRef
from repo_server.diff import ADDED, MODIFIED, REMOVED, diff_trees

TOP = 5  # paths named in a message or a dry run, per kind


@dataclass(frozen=True)
class Changes:
    added: int = 0
    changed: int = 0
    removed: int = 0
    # The shallowest paths of each kind (a removed directory stands for what was below
    # it), sorted, at most TOP of them.
    top_added: tuple[str, ...] = ()
    top_changed: tuple[str, ...] = ()
    top_removed: tuple[str, ...] = ()

    @property
    def counts(self) -> tuple[int, int, int]:
        return self.added, self.changed, self.removed

    def to_json(self) -> dict[str, object]:
        return {
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "top_added": list(self.top_added),
            "top_changed": list(self.top_changed),
            "top_removed": list(self.top_removed),
        }

    @classmethod
    def from_json(cls, value: object) -> Changes:
        if not isinstance(value, dict):
            raise ValueError("changes: expected an object")
        counts = [value.get(k) for k in ("added", "changed", "removed")]
        tops = [value.get(k) for k in ("top_added", "top_changed", "top_removed")]
        if not all(type(c) is int for c in counts) or not all(
            isinstance(t, list) and all(isinstance(p, str) for p in t) for t in tops
        ):
            raise ValueError("changes: expected counts and lists of paths")
        return cls(*counts, *(tuple(t) for t in tops))  # type: ignore[arg-type]

    def lines(self, would: bool = False) -> list[str]:
        """One line per kind that has changes, e.g. `removed 3 paths: /a, /b` (or
        `would remove ...`)."""
        out = []
        for verb, past, count, top in (
            ("add", "added", self.added, self.top_added),
            ("change", "changed", self.changed, self.top_changed),
            ("remove", "removed", self.removed, self.top_removed),
        ):
            if count:
                done = f"would {verb}" if would else past
                out.append(f"{done} {count} {_paths(count)}: {name_paths(top, count)}")
        return out or ["no path would change" if would else "no path changed"]


def _paths(n: int) -> str:
    return "path" if n == 1 else "paths"


def name_paths(top: Iterable[str], count: int) -> str:
    """The top paths, and how many more there are below or beside them."""
    named = list(top)
    text = ", ".join(named)
    return text + (" and what is below" if count > len(named) else "")


def _tops(found: list[str]) -> tuple[str, ...]:
    """The shallowest of found (sorted): paths with no ancestor also in found."""
    top: list[str] = []
    for path in sorted(found):
        if top and paths.is_within(path, top[-1]):
            continue
        top.append(path)
    return tuple(top[:TOP])


def summarize(
    changes: Iterable[tuple[str, str]], regions: Iterable[tuple[str, str, int]] = ()
) -> Changes:
    """Changes from diff_trees' (kind, path) list, and its one-sided (kind, mountpoint,
    paths below it) regions."""
    by_kind: dict[str, list[str]] = {ADDED: [], MODIFIED: [], REMOVED: []}
    for kind, path in changes:
        by_kind[kind].append(path)
    added, changed, removed = by_kind[ADDED], by_kind[MODIFIED], by_kind[REMOVED]
    count = {ADDED: len(added), REMOVED: len(removed)}
    for kind, mountpoint, below in regions:
        by_kind[kind].append(mountpoint)  # names the region among the top paths
        count[kind] += below
    return Changes(
        count[ADDED],
        len(changed),
        count[REMOVED],
        _tops(added),
        tuple(sorted(changed)[:TOP]),
        _tops(removed),
    )


def tree_changes(
    load: Callable[[ObjectRef], Catalog], old_root: ObjectRef, new_root: ObjectRef
) -> Changes:
    """What the tree of new_root changes from that of old_root."""
    if old_root == new_root:
        return Changes()
    regions: list[tuple[str, str, int]] = []

    def one_sided(kind: str, mountpoint: str, stats: TreeStats) -> None:
        regions.append((kind, mountpoint, stats.files + stats.dirs + stats.symlinks))

    return summarize(diff_trees(load, old_root, new_root, one_sided), regions)
