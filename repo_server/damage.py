"""What a damaged object takes with it, and the way back: the paths that name a missing
or corrupt object in each revision (`check` reports them), and moving corrupt objects out
of the served tree so that publishing the named files stores them again (`check --repair`).
"""

from __future__ import annotations

from cvmfs_format.catalog_rules import validate_catalog
from cvmfs_format.errors import CvmfsError, VerificationError
from cvmfs_format.objects import ObjectRef, max_catalog_content, verify_stored
from cvmfs_format.store import Storage
from repo_server.loading import Readable, load_catalog

NAMED_PATHS = 5  # paths shown per damaged object; the rest are counted

Naming = dict[str, set[int]]  # path -> the revisions in which it names the object


def paths_naming(
    repo: Readable, roots: list[tuple[int, ObjectRef]], wanted: set[str]
) -> dict[str, Naming]:
    """For each wanted object, the paths that name it in the revisions `roots` lists
    (revision, root catalog): a file for its content or one of its chunks, a directory
    for the catalog that holds it. Catalogs that cannot be read are skipped (check
    reports them)."""
    found: dict[str, Naming] = {digest: {} for digest in wanted}
    scanned: dict[str, tuple[list[tuple[str, str]], list[ObjectRef]]] = {}
    for revision, root in roots:
        if root.digest in wanted:
            found[root.digest].setdefault("/", set()).add(revision)
        stack, seen = [root], set()
        while stack:
            ref = stack.pop()
            if ref.digest in seen:
                continue
            seen.add(ref.digest)
            if ref.digest not in scanned:  # revisions share most catalogs: read each once
                scanned[ref.digest] = _names_in(repo, ref, wanted)
            hits, nested = scanned[ref.digest]
            for obj, path in hits:
                found[obj].setdefault(path, set()).add(revision)
            stack.extend(nested)
    return found


def _names_in(
    repo: Readable, ref: ObjectRef, wanted: set[str]
) -> tuple[list[tuple[str, str]], list[ObjectRef]]:
    """(object, path) for each wanted object the catalog names, and its nested catalogs."""
    try:
        catalog = load_catalog(repo.storage, ref)
    except (CvmfsError, OSError):
        return [], []
    try:
        hits = [(o.digest, o.path) for o in validate_catalog(catalog).objects if o.digest in wanted]
        rows = catalog.nested.values()
        hits.extend((row.hash, row.path) for row in rows if row.hash in wanted)
        return hits, [ObjectRef.catalog(row.hash, row.size) for row in rows]
    finally:
        catalog.close()


def name_damage(
    repo: Readable, roots: list[tuple[int, ObjectRef]], damaged: dict[str, str]
) -> list[str]:
    """Each damaged object's problem, followed by the paths that name it."""
    if not damaged:
        return []
    naming = paths_naming(repo, roots, set(damaged))
    return [problem + used_by(naming[digest]) for digest, problem in damaged.items()]


def used_by(naming: Naming) -> str:
    """'; used by /a (revision 3), /b (revisions 1, 2) and 4 more paths', or ''."""
    if not naming:
        return ""
    shown = sorted(naming)[:NAMED_PATHS]
    parts = []
    for path in shown:
        revisions = sorted(naming[path])
        word = "revision" if len(revisions) == 1 else "revisions"
        parts.append(f"{path} ({word} {', '.join(map(str, revisions))})")
    more = len(naming) - len(shown)
    return "; used by " + ", ".join(parts) + (f" and {more} more paths" if more else "")


def quarantine_corrupt(storage: Storage, corrupt: dict[str, int | None]) -> list[str]:
    """Move the objects whose stored bytes do not match their names (digest -> content
    size, None for catalogs) to the storage's quarantine; where each went. Each is read
    and verified once more first: a read that failed for another reason (a network
    error) never moves a good object. Nothing is deleted."""
    moved = []
    for digest, size in corrupt.items():
        try:
            stored = storage.get_object(digest)
        except FileNotFoundError:
            continue
        try:
            verify_stored(stored, digest, max(size or 0, max_catalog_content(len(stored))))
        except VerificationError:
            moved.append(storage.quarantine_object(digest))
    return moved
