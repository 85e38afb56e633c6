"""`repo-server check` and `info`: verify everything reachable; summarise a repository."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cvmfs_format.catalog import Catalog, NestedRef, TreeStats
from cvmfs_format.catalog_rules import nested_catalog_problems, validate_catalog
from cvmfs_format.errors import CvmfsError, FormatError
from cvmfs_format.objects import decode_object, max_stored_size
from repo_server.repository import LocalRepository


@dataclass
class CheckReport:
    revisions: list[int] = field(default_factory=list)
    catalogs: int = 0
    objects: int = 0
    problems: list[str] = field(default_factory=list)


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
        roots = [(head.revision, head.root_hash, head.root_size)]
    else:
        records = {r.revision: r for r in history.revisions()}
        wanted = (
            set(records)
            if all_revisions
            else {head.revision} | {t.revision for t in history.tags()}
        )
        roots = [
            (n, records[n].root_hash, records[n].root_size) for n in sorted(wanted) if n in records
        ]
        if head.revision not in records:
            report.problems.append(f"history does not list the head revision {head.revision}")
        if records.get(head.revision) and records[head.revision].root_hash != head.root_hash:
            report.problems.append("history and manifest disagree on the head's root catalog")
    seen_catalogs: set[str] = set()
    objects: dict[str, int] = {}
    for revision, root, root_size in roots:
        report.revisions.append(revision)
        walk_catalogs(repo, root, seen_catalogs, objects, report.problems, root_size)
    report.catalogs = len(seen_catalogs)
    report.objects = len(objects)
    with ThreadPoolExecutor() as pool:
        for problem in pool.map(lambda item: _verify_object(repo, *item), objects.items()):
            if problem:
                report.problems.append(problem)
    return report


def walk_catalogs(
    repo: LocalRepository,
    digest: str,
    seen: set[str],
    objects: dict[str, int],
    problems: list[str],
    stored_size: int | None = None,
) -> None:
    """Add the catalogs below root catalog `digest` to seen and the objects their entries
    and chunks name to objects (hash -> content size); catalogs that are unreadable or
    break the rules (catalog_rules.validate_catalog) to problems."""
    stack: list[tuple[str, int | None, NestedRef | None]] = [(digest, stored_size, None)]
    while stack:
        digest, size, ref = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            stored = repo.storage.get_object(digest)
            catalog = Catalog.from_bytes(decode_object(stored, digest), digest)
        except (CvmfsError, OSError) as exc:
            problems.append(f"catalog {digest}: {exc}")
            continue
        if ref is not None:
            problems.extend(nested_catalog_problems(ref, catalog, len(stored)))
        else:
            if size is not None and size != len(stored):
                problems.append(f"catalog {digest}: stored size {len(stored)}, expected {size}")
            if catalog.root != "/":
                problems.append(f"catalog {digest}: a root catalog rooted at {catalog.root}")
        checked = validate_catalog(catalog)
        problems.extend(f"catalog {digest}: {problem}" for problem in checked.problems)
        for named in checked.objects:
            if objects.setdefault(named.digest, named.size) != named.size:
                problems.append(
                    f"{named.path}: names object {named.digest} as {named.size} bytes, "
                    f"another entry as {objects[named.digest]}"
                )
        stack.extend((ref.hash, ref.size, ref) for ref in catalog.nested.values())
        catalog.close()


def catalog_objects(catalog: Catalog) -> dict[str, int]:
    """The file and chunk objects a catalog names (hash -> content size); FormatError
    if it breaks the rules."""
    checked = validate_catalog(catalog)
    if checked.problems:
        raise FormatError(f"catalog {catalog.digest}: {checked.problems[0]}")
    return {named.digest: named.size for named in checked.objects}


def _verify_object(repo: LocalRepository, digest: str, size: int) -> str | None:
    try:
        stored = repo.storage.get_object(digest)
        if len(stored) > max_stored_size(size):
            return f"object {digest}: stored size {len(stored)} too large for {size} bytes"
        decode_object(stored, digest, size)
    except FileNotFoundError:
        return f"object {digest}: missing"
    except (CvmfsError, OSError) as exc:
        return str(exc)
    return None


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
