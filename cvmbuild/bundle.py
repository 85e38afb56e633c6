"""`cvmbuild bundle`: an access trace (`cvmfs-client mount --trace`) becomes prefetch
bundle files in the build tree, one beside each trigger (docs/FORMAT.md, "Prefetch
bundles", says how triggers and members are chosen).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cvmbuild.errors import BuildError
from cvmfs_client.trace import TraceEvent, read_trace
from cvmfs_format import bundle as bundle_format
from cvmfs_format.errors import FormatError
from cvmfs_format.paths import MAX_NAME_BYTES, normalize

GENERATOR = "cvmbuild bundle"  # marks the bundle files this tool may replace


@dataclass
class _File:
    first_access: int  # index of its first event of any kind
    first_read: int | None = None  # index of its first read or chunk event
    ranges: list[tuple[int, int]] = field(default_factory=list)  # chunks read


@dataclass(frozen=True)
class BundleSummary:
    bundles: int
    members: int
    absent: int  # files of the trace that the tree does not have

    def line(self) -> str:
        return f"{self.bundles} bundles with {self.members} members written" + (
            f"; {self.absent} traced files are not in the tree" if self.absent else ""
        )


def _events(trace: Path) -> list[TraceEvent]:
    """Every session's events, one after the other."""
    hint = "give a file that `cvmfs-client mount --trace` wrote"
    try:
        with trace.open(encoding="utf-8") as lines:
            events = [event for session in read_trace(lines, str(trace)) for event in session]
    except OSError as exc:
        raise BuildError(f"trace {trace}: {exc.strerror}") from exc
    except (FormatError, UnicodeDecodeError) as exc:
        raise BuildError(f"{exc}; {hint}") from exc
    if not events:
        raise BuildError(f"trace {trace}: no file accesses recorded; {hint}")
    return events


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _traced_files(
    events: list[TraceEvent], tree: Path, traced_at: str
) -> tuple[dict[str, _File], int]:
    """The regular files of tree that the trace touched, by path relative to tree, and
    how many traced paths the tree lacks."""
    files: dict[str, _File] = {}
    absent: set[str] = set()
    base = traced_at.rstrip("/") + "/"
    for index, event in enumerate(events):
        if not event.path.startswith(base):
            continue
        rel = event.path[len(base) :]
        if rel in absent or bundle_format.is_bundle_name(rel.rpartition("/")[2]):
            continue
        found = files.get(rel)
        if found is None:
            local = tree / rel
            if local.is_symlink() or not local.is_file():
                absent.add(rel)
                continue
            found = files[rel] = _File(index)
        if event.kind != "lookup" and found.first_read is None:
            found.first_read = index
        if event.kind == "chunk":
            found.ranges.append((event.offset, event.offset + event.size))
    return files, len(absent)


def _groups(files: dict[str, _File]) -> dict[str, list[str]]:
    """Files grouped by their top-level directory below the deepest directory that
    holds them all (in a Python environment: one group per package); the files directly
    in that directory form one group too."""
    common = os.path.commonpath([os.path.dirname(rel) or "." for rel in files])
    common = "" if common == "." else common
    groups: dict[str, list[str]] = {}
    for rel in files:
        below = rel[len(common) + 1 :] if common else rel
        top, _, rest = below.partition("/")
        groups.setdefault(top if rest else "", []).append(rel)
    return groups


def _bundles(files: dict[str, _File]) -> dict[str, list[str]]:
    """Trigger -> members, in first-read order. A group's trigger is its first file
    touched, its members the other files of it that were read. A trigger that was read
    is also a member of the bundle triggered just before it: its own bundle starts only
    when it is looked up, and then its read waits (numpy.libs/libopenblas.so, which
    numpy's import loads, joins numpy's bundle)."""
    if not files:
        return {}
    triggers = [
        (min(group, key=lambda rel: files[rel].first_access), group)
        for group in _groups(files).values()
    ]
    triggers.sort(key=lambda pair: files[pair[0]].first_access)
    bundles: dict[str, list[str]] = {}
    for index, (trigger, group) in enumerate(triggers):
        members = bundles.setdefault(trigger, [])
        members += [rel for rel in group if files[rel].first_read is not None and rel != trigger]
        if index > 0 and files[trigger].first_read is not None:
            bundles[triggers[index - 1][0]].append(trigger)
    for members in bundles.values():
        members.sort(key=lambda rel: files[rel].first_read or 0)
    return {trigger: members for trigger, members in bundles.items() if members}


def _remove_old_bundles(tree: Path) -> None:
    """The bundles an earlier run wrote: a tree holds the bundles of one trace."""
    for root, _dirs, names in os.walk(tree):
        for name in names:
            if not bundle_format.is_bundle_name(name):
                continue
            path = Path(root) / name
            try:
                if json.loads(path.read_bytes()).get("generator") == GENERATOR:
                    path.unlink()
            except (OSError, ValueError, AttributeError):
                continue  # not ours: leave it alone


def make_bundles(
    trace: Path, tree: Path, prefix: str, traced_at: str | None = None
) -> BundleSummary:
    """Write the bundles of trace into tree, which is (or will be) published at prefix;
    the trace was recorded with the tree at traced_at (default: prefix)."""
    try:
        prefix = normalize(prefix)
        traced_at = normalize(traced_at or prefix)
    except FormatError as exc:
        raise BuildError(str(exc)) from exc
    if not tree.is_dir():
        raise BuildError(f"{tree}: not a directory; give the build tree with --tree")
    events = _events(trace)
    files, absent = _traced_files(events, tree, traced_at)
    _remove_old_bundles(tree)
    written = members_total = 0
    for trigger, members in _bundles(files).items():
        base = prefix.rstrip("/")
        bundle = bundle_format.Bundle(
            [f"{base}/{rel}" for rel in members],
            {f"{base}/{rel}": _merged(files[rel].ranges) for rel in members if files[rel].ranges},
        )
        directory, _, name = trigger.rpartition("/")
        if len(bundle_format.bundle_name(name).encode()) > MAX_NAME_BYTES:
            continue  # a trigger whose name leaves no room for the prefix
        target = tree / directory / bundle_format.bundle_name(name)
        target.write_bytes(bundle_format.encode(bundle, generator=GENERATOR))
        written += 1
        members_total += len(members)
    return BundleSummary(written, members_total, absent)
