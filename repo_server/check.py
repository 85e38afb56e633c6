"""`repo-server check` and `info`: verify everything reachable; summarise a repository."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cvmfs_client.console import utc
from cvmfs_client.progress import Progress
from cvmfs_format.catalog import Catalog, NestedRef, TreeStats
from cvmfs_format.catalog_rules import (
    check_root_catalog,
    nested_catalog_problems,
    validate_catalog,
)
from cvmfs_format.errors import CvmfsError, FormatError, VerificationError
from cvmfs_format.objects import ObjectRef, decode_object, max_stored_size
from repo_server.damage import name_damage
from repo_server.loading import Readable, load_catalog
from repo_server.repository import LocalRepository
from repo_server.rotation import rotation_warnings


@dataclass
class CheckReport:
    revisions: list[int] = field(default_factory=list)
    catalogs: int = 0
    objects: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # clients read fine; the operator acts
    # Objects whose stored bytes are not what their name says: digest -> content size
    # (None for catalogs). `check --repair` moves them to the quarantine.
    corrupt: dict[str, int | None] = field(default_factory=dict)
    content_damaged: bool = False  # a file or chunk object: publishing stores it again
    # A catalog or the history is damaged: publishing does not bring those back.
    structure_damaged: bool = False

    def document(self) -> dict[str, object]:
        """What `check --json` prints."""
        return {
            "ok": not self.problems,
            "revisions": self.revisions,
            "catalogs": self.catalogs,
            "objects": self.objects,
            "problems": self.problems,
            "warnings": self.warnings,
            "corrupt_objects": sorted(self.corrupt),
        }


def check(repo: Readable, all_revisions: bool = False, progress: bool = False) -> CheckReport:
    """Verify the head (and the tagged revisions, or all) as clients would read them; a
    LocalRepository's key files too (rotation_warnings)."""
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
    if isinstance(repo, LocalRepository):
        report.warnings += rotation_warnings(repo, head)
    try:
        history = repo.history(head)
    except (CvmfsError, OSError) as exc:
        report.problems.append(f"history {head.history_hash}: {exc}")
        report.structure_damaged = True
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
    damaged: dict[str, str] = {}  # digest -> problem, for catalogs and objects alike
    for revision, root in roots:
        report.revisions.append(revision)
        walk_catalogs(repo, root, seen_catalogs, objects, report.problems, damaged, report.corrupt)
    report.catalogs = len(seen_catalogs)
    report.objects = len(objects)
    report.structure_damaged |= bool(damaged)  # so far only catalogs
    with (
        ThreadPoolExecutor() as pool,
        Progress("checking", len(objects), "objects", enabled=progress) as bar,
    ):
        for digest, problem, corrupt in pool.map(
            lambda item: _verify_object(repo, *item), objects.items()
        ):
            bar.update(1)
            if problem:
                damaged[digest] = problem
                report.content_damaged = True
                if corrupt:
                    report.corrupt[digest] = objects[digest]
    # Unreadable catalogs and bad objects, each with the paths that use it.
    report.problems.extend(name_damage(repo, roots, damaged))
    return report


def walk_catalogs(
    repo: Readable,
    root: ObjectRef,
    seen: set[str],
    objects: dict[str, int],
    problems: list[str],
    damaged: dict[str, str] | None = None,
    corrupt: dict[str, int | None] | None = None,
) -> None:
    """Add the catalogs below the root catalog to seen and the objects their entries and
    chunks name to objects (hash -> content size); catalogs that are unreadable or break
    the rules (catalog_rules.validate_catalog) to problems; given damaged, the unreadable
    ones go there by digest instead (and to corrupt if their bytes fail verification)."""
    stack: list[tuple[ObjectRef, NestedRef | None]] = [(root, None)]
    while stack:
        ref, row = stack.pop()
        if ref.digest in seen:
            continue
        seen.add(ref.digest)
        try:
            catalog = load_catalog(repo.storage, ref)
        except (CvmfsError, OSError) as exc:
            problem = f"catalog {ref.digest}: {exc}"
            if damaged is None:
                problems.append(problem)
            else:
                damaged[ref.digest] = problem
            if corrupt is not None and isinstance(exc, VerificationError):
                corrupt[ref.digest] = None
            continue
        if row is not None:
            problems.extend(nested_catalog_problems(row, catalog, ref.size))
        else:
            try:
                check_root_catalog(catalog)
            except FormatError as exc:
                problems.append(str(exc))
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


def _verify_object(repo: Readable, digest: str, size: int) -> tuple[str, str | None, bool]:
    """(digest, the problem or None, whether the stored bytes are corrupt)."""
    try:
        stored = repo.storage.get_object(digest, max_stored_size(size))
        if len(stored) > max_stored_size(size):
            too_large = f"object {digest}: stored size {len(stored)} too large for {size} bytes"
            return digest, too_large, False
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
    refused: str | None  # why clients refuse the head (e.g. it expired), if they do

    def document(self) -> dict[str, object]:
        """What `info --json` prints."""
        return {
            "name": self.name,
            "revision": self.revision,
            "published": utc(self.published),
            "manifest_expires": utc(self.expires),
            "whitelist_expires": utc(self.whitelist_expires),
            "files": self.stats.files,
            "directories": self.stats.dirs,
            "symlinks": self.stats.symlinks,
            "catalogs": self.stats.catalogs,
            "logical_bytes": self.stats.bytes,
            "stored_bytes": self.stored_bytes,
            "stored_objects": self.stored_objects,
        }


def info(repo: LocalRepository) -> Info:
    """What the repository holds; also when clients refuse its head (an expired
    whitelist is when the operator needs this most)."""
    refused = None
    try:
        head = repo.head()
    except CvmfsError as exc:
        refused = str(exc)
        head = repo.head_unverified()
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
        refused,
    )
