"""`repo-server check` and `info`: verify everything reachable; summarise a repository."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cvmfs_format.catalog import Catalog, NestedRef, TreeStats
from cvmfs_format.catalog_rules import nested_catalog_problems, validate_catalog
from cvmfs_format.errors import CvmfsError, FormatError
from cvmfs_format.objects import ObjectRef, decode_object, max_stored_size
from repo_server.loading import load_catalog
from repo_server.repository import LocalRepository
from repo_server.rotation import rotation_warnings


@dataclass
class CheckReport:
    revisions: list[int] = field(default_factory=list)
    catalogs: int = 0
    objects: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # clients read fine; the operator acts


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
    report.warnings += rotation_warnings(repo, head)
    try:
        history = repo.history(head)
    except (CvmfsError, OSError) as exc:
        report.problems.append(f"history {head.history_hash}: {exc}")
        roots = [(head.revision, ObjectRef.catalog(head.root_hash, head.root_size))]
    else:
        records = {r.revision: r for r in history.revisions()}
        wanted = (
            set(records)
            if all_revisions
            else {head.revision} | {t.revision for t in history.tags()}
        )
        # The head's root as the manifest names it: that is what clients load.
        roots = sorted(
            [(head.revision, ObjectRef.catalog(head.root_hash, head.root_size))]
            + [
                (n, ObjectRef.catalog(records[n].root_hash, records[n].root_size))
                for n in wanted - {head.revision}
                if n in records
            ]
        )
        if head.revision not in records:
            report.problems.append(f"history does not list the head revision {head.revision}")
        elif (records[head.revision].root_hash, records[head.revision].root_size) != (
            head.root_hash,
            head.root_size,
        ):
            report.problems.append("history and manifest disagree on the head's root catalog")
    seen_catalogs: set[str] = set()
    objects: dict[str, int] = {}
    for revision, root in roots:
        report.revisions.append(revision)
        walk_catalogs(repo, root, seen_catalogs, objects, report.problems)
    report.catalogs = len(seen_catalogs)
    report.objects = len(objects)
    with ThreadPoolExecutor() as pool:
        for problem in pool.map(lambda item: _verify_object(repo, *item), objects.items()):
            if problem:
                report.problems.append(problem)
    return report


def walk_catalogs(
    repo: LocalRepository,
    root: ObjectRef,
    seen: set[str],
    objects: dict[str, int],
    problems: list[str],
) -> None:
    """Add the catalogs below the root catalog to seen and the objects their entries and
    chunks name to objects (hash -> content size); catalogs that are unreadable or break
    the rules (catalog_rules.validate_catalog) to problems."""
    stack: list[tuple[ObjectRef, NestedRef | None]] = [(root, None)]
    while stack:
        ref, row = stack.pop()
        if ref.digest in seen:
            continue
        seen.add(ref.digest)
        try:
            catalog = load_catalog(repo.storage, ref)
        except (CvmfsError, OSError) as exc:
            problems.append(f"catalog {ref.digest}: {exc}")
            continue
        if row is not None:
            problems.extend(nested_catalog_problems(row, catalog, ref.size))
        elif catalog.root != "/":
            problems.append(f"catalog {ref.digest}: a root catalog rooted at {catalog.root}")
        checked = validate_catalog(catalog)
        problems.extend(f"catalog {ref.digest}: {problem}" for problem in checked.problems)
        for named in checked.objects:
            if objects.setdefault(named.digest, named.size) != named.size:
                problems.append(
                    f"{named.path}: names object {named.digest} as {named.size} bytes, "
                    f"another entry as {objects[named.digest]}"
                )
        stack.extend(
            (ObjectRef.catalog(nested.hash, nested.size), nested)
            for nested in catalog.nested.values()
        )
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
    root = load_catalog(repo.storage, ObjectRef.catalog(head.root_hash, head.root_size))
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
