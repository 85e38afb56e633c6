"""`repo-server gc`: delete the objects that no kept revision reaches.

Kept are the newest N revisions (default: all), every tagged one, and every one that
clients may still read because it was the head moments ago; the history written
afterwards lists only those. Marking and sweeping hold the publish lock, and objects
and temporary files younger than the grace period are spared, because an HTTP
publisher uploads its objects before it takes the lock (docs/OPERATING.md, "Garbage
collection").
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cvmfs_client.progress import Progress
from cvmfs_format.history import RevisionRecord
from cvmfs_format.objects import ObjectRef
from repo_server.check import walk_catalogs
from repo_server.errors import RepoError
from repo_server.http_caching import SIGNED_DOCUMENT_MAX_AGE_S
from repo_server.repository import LocalRepository

DEFAULT_GRACE_S = 3600


@dataclass(frozen=True)
class GcReport:
    kept: list[int]
    dropped: list[int]
    removed_objects: int  # or, in a dry run, that would be removed
    removed_bytes: int
    spared_objects: int  # unreferenced but younger than the grace period
    dry_run: bool
    in_use: list[int]  # kept beyond --keep-revisions: replaced less than `window` ago
    window: float  # seconds a replaced revision stays readable to clients
    ttl: int  # the manifest's, which with SIGNED_DOCUMENT_MAX_AGE_S makes the window unless grace
    removed_temporaries: int  # writers' temporary files


def readable_window(ttl: int, grace: float) -> float:
    """How long after a revision stopped being the head a client may still read it: it
    keeps a manifest for its ttl, fetched up to SIGNED_DOCUMENT_MAX_AGE_S late from a proxy; the
    grace period if that is longer."""
    return max(ttl + SIGNED_DOCUMENT_MAX_AGE_S, grace)


def recently_replaced(records: Iterable[RevisionRecord], now: float, window: float) -> set[int]:
    """The revisions that stopped being the head less than window seconds before now:
    each did when the next one in the history was published."""
    ordered = sorted(records, key=lambda r: r.revision)
    pairs = itertools.pairwise(ordered)
    return {old.revision for old, new in pairs if now - new.published < window}


def collect_garbage(
    repo: LocalRepository,
    *,
    keep_revisions: int | None = None,
    grace: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    progress: bool = False,
) -> GcReport:
    if keep_revisions is not None and keep_revisions < 1:
        raise RepoError("--keep-revisions must be at least 1: the head is always kept")
    if grace < 0:
        raise RepoError("--grace must be 0 or more seconds")
    with repo.lock():
        head = repo.head()
        history = repo.history(head)
        records = {r.revision: r for r in history.revisions()}
        numbers = sorted(records)
        kept = set(numbers if keep_revisions is None else numbers[-keep_revisions:])
        kept |= {t.revision for t in history.tags()} & records.keys()
        window = readable_window(head.ttl, grace)
        in_use = recently_replaced(records.values(), time.time(), window) - kept
        kept |= in_use
        dropped = sorted(records.keys() - kept)
        roots = {ObjectRef.catalog(records[n].root_hash, records[n].root_size) for n in kept}
        roots.add(ObjectRef.catalog(head.root_hash, head.root_size))
        # The history the head names now stays too: a client may hold this manifest
        # for its ttl after the history below replaces it.
        reachable = _mark(repo, roots) | {head.history_hash}
        if dropped and not dry_run:
            # Before any object goes: a crash then leaves a history naming only
            # revisions whose objects are all still stored.
            def drop(db: sqlite3.Connection) -> None:
                db.executemany("DELETE FROM revisions WHERE revision = ?", [(n,) for n in dropped])

            reachable.add(repo.rewrite_history(drop).history_hash)
        removed, removed_bytes, spared = _sweep(
            repo, reachable, time.time() - grace, dry_run, progress
        )
        if not dry_run:
            repo.storage.sweep_temporaries(grace)
        # Taking the lock swept those of writers gone too, as a publish does.
        temporaries = repo.storage.temporaries_removed
    return GcReport(
        sorted(kept),
        dropped,
        removed,
        removed_bytes,
        spared,
        dry_run,
        sorted(in_use),
        window,
        head.ttl,
        temporaries,
    )


def _mark(repo: LocalRepository, roots: set[ObjectRef]) -> set[str]:
    """Every catalog and object the root catalogs reach; refuses to go on if any of
    those catalogs cannot be read, as the objects it names would look unreferenced."""
    catalogs: set[str] = set()
    objects: dict[str, int] = {}
    problems: list[str] = []
    for root in sorted(roots, key=lambda ref: ref.digest):
        walk_catalogs(repo, root, catalogs, objects, problems)
    if problems:
        raise RepoError(
            f"gc stopped before deleting anything: {problems[0]}; repair the repository "
            "(`repo-server check --all` lists the damage) or roll back, then run gc again"
        )
    return catalogs | objects.keys()


def _sweep(
    repo: LocalRepository, reachable: set[str], cutoff: float, dry_run: bool, progress: bool
) -> tuple[int, int, int]:
    storage = repo.storage
    stored = list(storage.iter_objects())
    removed = removed_bytes = spared = 0
    with Progress("gc", len(stored), "objects", enabled=progress) as bar:
        for digest, size in stored:
            bar.update(1)
            if digest in reachable:
                continue
            if storage.object_mtime(digest) > cutoff:
                spared += 1
                continue
            if not dry_run:
                storage.delete_object(digest)
            removed += 1
            removed_bytes += size
    return removed, removed_bytes, spared
