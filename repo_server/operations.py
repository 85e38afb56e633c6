"""The operator's history commands: naming revisions (tags) and rolling back.

Both change only the history and the manifest (docs/FORMAT.md, "History"); a rollback
publishes a new revision whose root catalog is an old one's, so revisions only increase.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from cvmfs_format.errors import CvmfsError, NotFoundError
from cvmfs_format.history import History, RevisionRecord, Tag
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import ObjectRef
from repo_server import revisions
from repo_server.errors import Refused, RepoError, UnknownRevision
from repo_server.loading import load_catalog
from repo_server.repository import LocalRepository, validate_tag


def resolve_revision(history: History, spec: str) -> RevisionRecord:
    """The revision `spec` names: digits are a revision number, anything else a tag."""
    return _revision(history, int(spec) if spec.isdigit() else _tag(history, spec).revision)


def _revision(history: History, number: int) -> RevisionRecord:
    try:
        return history.revision(number)
    except NotFoundError as exc:
        raise UnknownRevision(f"{exc}; {_what_exists(history)}") from exc


def _tag(history: History, name: str) -> Tag:
    try:
        return history.tag(name)
    except NotFoundError as exc:
        raise UnknownRevision(f"{exc}; {_what_exists(history)}") from exc


def _what_exists(history: History) -> str:
    numbers = format_revisions([r.revision for r in history.revisions()])
    tags = ", ".join(t.name for t in history.tags()) or "none"
    return f"the history holds revisions {numbers} and tags: {tags} (see `repo-server tags`)"


def format_revisions(numbers: list[int]) -> str:
    """Sorted revision numbers as ranges: 0-3, 5, 7-9."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


@dataclass(frozen=True)
class TagChange:
    name: str
    revision: int
    manifest: Manifest
    changed: bool  # False if the tag already named that revision


def set_tag(repo: LocalRepository, name: str, revision: int | None = None) -> TagChange:
    """Name a revision (default: the head); refuses to move an existing tag."""
    validate_tag(name)
    if name.isdigit():
        raise RepoError(f"tag {name!r}: digits alone would read as a revision number; add a letter")
    with repo.lock():
        head = repo.head()
        history = repo.history(head)
        record = (
            history.revision(head.revision) if revision is None else _revision(history, revision)
        )
        existing = {t.name: t.revision for t in history.tags()}
        if name in existing:
            if existing[name] != record.revision:
                raise RepoError(
                    f"tag {name!r} already names revision {existing[name]}; delete it first "
                    f"with `repo-server tag DIR --delete {name}`"
                )
            return TagChange(name, record.revision, head, changed=False)

        def add(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO tags VALUES (?, ?, ?)", (name, record.revision, int(time.time()))
            )

        return TagChange(name, record.revision, repo.rewrite_history(add), changed=True)


def delete_tag(repo: LocalRepository, name: str) -> TagChange:
    with repo.lock():
        revision = _tag(repo.history(repo.head()), name).revision

        def remove(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM tags WHERE name = ?", (name,))

        return TagChange(name, revision, repo.rewrite_history(remove), changed=True)


@dataclass(frozen=True)
class Rollback:
    target: RevisionRecord
    result: revisions.NewRevision


def rollback(
    repo: LocalRepository,
    spec: str,
    author: revisions.Author,
    *,
    path: str = "/",
    message: str | None = None,
    dry_run: bool = False,
) -> Rollback:
    """Publish what path held in revision `spec` (number or tag) as the next revision:
    for `/`, the whole tree of that revision."""
    with repo.lock():
        return rollback_locked(repo, spec, author, path=path, message=message, dry_run=dry_run)


def rollback_locked(
    repo: LocalRepository,
    spec: str,
    author: revisions.Author,
    *,
    path: str = "/",
    message: str | None = None,
    dry_run: bool = False,
    scratch: revisions.ScratchSink | None = None,
) -> Rollback:
    """rollback, for a caller holding the publish lock (the publish API)."""
    head = repo.head()
    target = resolve_revision(repo.history(head), spec)
    if path == "/" and target.revision == head.revision:
        raise Refused(f"revision {head.revision} is the head already; nothing to roll back")
    root = ObjectRef.catalog(target.root_hash, target.root_size)
    try:  # never publish a revision whose root catalog is gone or damaged
        load_catalog(repo.storage, root).close()
    except CvmfsError as exc:
        raise RepoError(
            f"revision {target.revision}: its root catalog cannot be used ({exc}); "
            "run `repo-server check --all`"
        ) from exc
    where = "" if path == "/" else f" of {path}"
    text = message if message is not None else f"rollback{where} to revision {target.revision}"
    intent = revisions.Intent(revisions.ROLLBACK, path, text, dry_run=dry_run)
    return Rollback(
        target,
        revisions.rollback_path(repo, intent, author, root, target.revision, scratch=scratch),
    )
