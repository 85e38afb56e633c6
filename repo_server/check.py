"""`repo-server check` and `info`: verify everything reachable; summarise a repository."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cvmfs_format.catalog import Catalog, TreeStats
from cvmfs_format.errors import CvmfsError, VerificationError
from cvmfs_format.objects import decode_object, max_stored_size
from repo_server.damage import name_damage
from repo_server.repository import LocalRepository


@dataclass
class CheckReport:
    revisions: list[int] = field(default_factory=list)
    catalogs: int = 0
    objects: int = 0
    problems: list[str] = field(default_factory=list)
    # Objects whose stored bytes are not what their name says: digest -> content size
    # (None for catalogs). `check --repair` moves them to the quarantine.
    corrupt: dict[str, int | None] = field(default_factory=dict)
    content_damaged: bool = False  # a file or chunk object: publishing stores it again
    # A catalog or the history is damaged: publishing does not bring those back.
    structure_damaged: bool = False


def check(repo: LocalRepository, all_revisions: bool = False) -> CheckReport:
    report = CheckReport()
    try:
        head = repo.head()
    except CvmfsError as exc:
        report.problems.append(f"manifest or whitelist: {exc}")
        try:
            head = repo.head_unverified()
        except CvmfsError as parse_error:
            report.problems.append(f"manifest: {parse_error}")
            return report
    try:
        history = repo.history(head)
    except (CvmfsError, OSError) as exc:
        report.problems.append(f"history {head.history_hash}: {exc}")
        report.structure_damaged = True
        roots = [(head.revision, head.root_hash)]
    else:
        records = {r.revision: r for r in history.revisions()}
        wanted = (
            set(records)
            if all_revisions
            else {head.revision} | {t.revision for t in history.tags()}
        )
        roots = [(n, records[n].root_hash) for n in sorted(wanted) if n in records]
        if head.revision not in records:
            report.problems.append(f"history does not list the head revision {head.revision}")
        if records.get(head.revision) and records[head.revision].root_hash != head.root_hash:
            report.problems.append("history and manifest disagree on the head's root catalog")
    seen_catalogs: set[str] = set()
    objects: dict[str, int] = {}
    damaged: dict[str, str] = {}  # digest -> problem, for catalogs and objects alike
    for revision, root in roots:
        report.revisions.append(revision)
        walk_catalogs(repo, root, seen_catalogs, objects, [], damaged, report.corrupt)
    report.catalogs = len(seen_catalogs)
    report.objects = len(objects)
    report.structure_damaged |= bool(damaged)  # so far only catalogs
    with ThreadPoolExecutor() as pool:
        for digest, problem, corrupt in pool.map(
            lambda item: _verify_object(repo, *item), objects.items()
        ):
            if problem:
                damaged[digest] = problem
                report.content_damaged = True
                if corrupt:
                    report.corrupt[digest] = objects[digest]
    report.problems.extend(name_damage(repo, roots, damaged))
    return report


def walk_catalogs(
    repo: LocalRepository,
    digest: str,
    seen: set[str],
    objects: dict[str, int],
    problems: list[str],
    damaged: dict[str, str] | None = None,
    corrupt: dict[str, int | None] | None = None,
) -> None:
    """Add the catalogs below root catalog `digest` to seen and the objects their entries
    and chunks name to objects (hash -> content size); unreadable catalogs to problems
    (and by digest to damaged; those whose bytes fail verification to corrupt)."""
    stack = [digest]
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            data = decode_object(repo.storage.get_object(digest), digest)
            catalog = Catalog.from_bytes(data, digest)
        except (CvmfsError, OSError) as exc:
            problems.append(f"catalog {digest}: {exc}")
            if damaged is not None:
                damaged[digest] = f"catalog {digest}: {exc}"
            if corrupt is not None and isinstance(exc, VerificationError):
                corrupt[digest] = None
            continue
        objects.update(catalog_objects(catalog))
        stack.extend(ref.hash for ref in catalog.nested.values())
        catalog.close()


def catalog_objects(catalog: Catalog) -> dict[str, int]:
    """The file and chunk objects a catalog names (hash -> content size)."""
    objects = {e.hash: e.size for e in catalog.all_entries() if e.is_file and e.hash is not None}
    objects.update(catalog.all_chunk_hashes())
    return objects


def _verify_object(repo: LocalRepository, digest: str, size: int) -> tuple[str, str | None, bool]:
    """(digest, the problem or None, whether the stored bytes are corrupt)."""
    try:
        stored = repo.storage.get_object(digest)
        if len(stored) > max_stored_size(size):
            return (
                digest,
                f"object {digest}: stored size {len(stored)} too large for {size} bytes",
                False,
            )
        decode_object(stored, digest, size)
    except FileNotFoundError:
        return digest, f"object {digest}: missing", False
    except VerificationError as exc:
        return digest, str(exc), True
    except (CvmfsError, OSError) as exc:
        return digest, str(exc), False
    return digest, None, False


@dataclass(frozen=True)
class Info:
    name: str
    revision: int
    published: int
    expires: int
    whitelist_expires: int
    stats: TreeStats
    stored_bytes: int
    stored_objects: int


def info(repo: LocalRepository) -> Info:
    head = repo.head()
    data = decode_object(repo.storage.get_object(head.root_hash), head.root_hash)
    root = Catalog.from_bytes(data, head.root_hash)
    stats = root.stats()
    root.close()
    count = total = 0
    for _, size in repo.storage.iter_objects():
        count += 1
        total += size
    return Info(
        head.name,
        head.revision,
        head.published,
        head.expires,
        repo.whitelist().expires,
        stats,
        total,
        count,
    )


def format_time(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
