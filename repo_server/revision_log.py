"""`repo-server log`: the revisions of a repository, newest first, with who made each,
when, with which tool, and what it changed; optionally only those that changed a path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cvmfs_format import paths
from cvmfs_format.catalog import Catalog
from cvmfs_format.errors import CvmfsError
from cvmfs_format.history import History, RevisionRecord
from cvmfs_format.objects import ObjectRef
from cvmfs_format.signed import format_time
from cvmfs_format.trust import TrustedState, pinned_name
from repo_server.diff import diff_trees
from repo_server.errors import RepoError

LoadCatalog = Callable[[ObjectRef], Catalog]


def select(
    history: History, load: LoadCatalog, path: str | None = None, limit: int | None = None
) -> list[RevisionRecord]:
    """Revisions newest first; with path, only those that changed something at or below
    it (judged by the recorded path and counts, else by comparing with the revision
    before)."""
    records = history.revisions()
    chosen: list[RevisionRecord] = []
    for index in range(len(records) - 1, -1, -1):
        if limit is not None and len(chosen) >= limit:
            break
        record = records[index]
        if path is None or _touches(record, records[index - 1] if index else None, path, load):
            chosen.append(record)
    return chosen


def _touches(
    record: RevisionRecord, before: RevisionRecord | None, path: str, load: LoadCatalog
) -> bool:
    if not (paths.is_within(record.path, path) or paths.is_within(path, record.path)):
        return False
    counts = (record.added, record.changed, record.removed)
    if counts == (0, 0, 0):  # recorded as changing nothing at all
        return False
    if paths.is_within(record.path, path) and None not in counts:
        return any(counts)
    if before is None:
        return True
    try:
        changes = diff_trees(
            load,
            ObjectRef.catalog(before.root_hash, before.root_size),
            ObjectRef.catalog(record.root_hash, record.root_size),
        )
    except CvmfsError:  # an older revision's catalogs are gone (gc): cannot tell
        return True
    return any(paths.is_within(change.path, path) for change in changes)


def as_json(record: RevisionRecord) -> dict[str, object]:
    value = asdict(record)
    value["published_utc"] = format_time(record.published)
    return value


def line(record: RevisionRecord) -> str:
    """One revision as a line: number, time (UTC), who, what, counts, message."""
    who = record.publisher or "unknown"
    if record.via:
        who += f" ({record.via})"
    kind = record.kind or "publish"
    counts = (
        "changes not recorded"
        if record.added is None
        else f"+{record.added} ~{record.changed} -{record.removed}"
    )
    tool = f" [{record.tool}]" if record.tool else ""
    text = f": {record.message}" if record.message else ""
    return (
        f"{record.revision}\t{format_time(record.published)}\t{who}\t{kind} {record.path}"
        f"\t{counts}{tool}{text}"
    )


def served_history(url: str, key: str | None) -> tuple[History, LoadCatalog]:
    """The history of a served repository (or mirror), verified as a client verifies
    it, and a loader of its catalogs."""
    from cvmfs_client.fetcher import fetcher_for
    from cvmfs_client.repository import RepositoryReader
    from repo_server import keys

    if not key:
        raise RepoError(f"{url}: give the repository's public key (--key NAME.pub)")
    trust = TrustedState(keys.load_public_key(Path(key)), pinned_name(key, None))
    reader = RepositoryReader(fetcher_for(url), trust)
    reader.load_manifest()

    def load(ref: ObjectRef) -> Catalog:
        content = reader.fetch_object(ref.digest, ref.size, stored=True)
        return Catalog.from_bytes(content, ref.digest)

    return reader.history(), load
