"""What a damaged object takes with it, and the way back: the paths that name a missing
or corrupt object in each revision (`check` reports them), and moving corrupt objects out
of the served tree so that publishing the named files stores them again (`check --repair`).
"""

from __future__ import annotations

from cvmfs_format.catalog import Catalog
from cvmfs_format.errors import CvmfsError, VerificationError
from cvmfs_format.objects import decode_object, max_catalog_content, verify_stored
from repo_server.repository import LocalRepository

NAMED_PATHS = 5  # paths shown per damaged object; the rest are counted

Naming = dict[str, set[int]]  # path -> the revisions in which it names the object


def paths_naming(
    repo: LocalRepository, roots: list[tuple[int, str]], wanted: set[str]
) -> dict[str, Naming]:
    """For each wanted object, the paths that name it in the revisions `roots` lists
    (revision, root catalog): a file for its content or one of its chunks, a directory
    for the catalog that holds it. Catalogs that cannot be read are skipped (check
    reports them)."""
    found: dict[str, Naming] = {digest: {} for digest in wanted}
    scanned: dict[str, tuple[list[tuple[str, str]], list[str]]] = {}
    for revision, root in roots:
        if root in wanted:
            found[root].setdefault("/", set()).add(revision)
        stack, seen = [root], set()
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            if digest not in scanned:  # revisions share most catalogs: read each once
                scanned[digest] = _names_in(repo, digest, wanted)
            hits, nested = scanned[digest]
            for obj, path in hits:
                found[obj].setdefault(path, set()).add(revision)
            stack.extend(nested)
    return found


def _names_in(
    repo: LocalRepository, digest: str, wanted: set[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """(object, path) for each wanted object the catalog names, and its nested catalogs."""
    try:
        catalog = Catalog.from_bytes(decode_object(repo.storage.get_object(digest), digest), digest)
    except (CvmfsError, OSError):
        return [], []
    try:
        hits = []
        for entry in catalog.all_entries():
            if not entry.is_file:
                continue
            if entry.hash in wanted:
                hits.append((entry.hash, entry.path))
            if entry.chunked:
                chunks = catalog.chunks(entry.path)
                hits.extend((c.hash, entry.path) for c in chunks if c.hash in wanted)
        refs = catalog.nested.values()
        hits.extend((ref.hash, ref.path) for ref in refs if ref.hash in wanted)
        return hits, [ref.hash for ref in refs]
    finally:
        catalog.close()


def name_damage(
    repo: LocalRepository, roots: list[tuple[int, str]], damaged: dict[str, str]
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


def quarantine_corrupt(repo: LocalRepository, corrupt: dict[str, int | None]) -> list[str]:
    """Move the objects whose stored bytes do not match their names (digest -> content
    size, None for catalogs) to the storage's quarantine; where each went. Each is read
    and verified once more first: a read that failed for another reason (a network
    error) never moves a good object. Nothing is deleted."""
    moved = []
    for digest, size in corrupt.items():
        try:
            stored = repo.storage.get_object(digest)
        except FileNotFoundError:
            continue
        try:
            verify_stored(stored, digest, max(size or 0, max_catalog_content(len(stored))))
        except VerificationError:
            moved.append(repo.storage.quarantine_object(digest))
    return moved
