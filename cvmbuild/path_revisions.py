"""`cvmbuild remove` and `cvmbuild rollback`: a path removed, or given back what it held
in an older revision, as a new revision; into a repository directory or through the
publish API within the token's path (docs/PUBLISHING.md, "Removing and rolling back").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvmbuild.errors import BuildError
from cvmbuild.publish import Committed, committed
from cvmfs_client.network import is_url
from cvmfs_format.errors import FormatError
from cvmfs_format.paths import normalize
from repo_server import operations, revisions
from repo_server.changes import Changes
from repo_server.repository import open_repository


@dataclass(frozen=True)
class PathChange:
    kind: str  # revisions.REMOVE or revisions.ROLLBACK
    path: str
    message: str = ""
    to: str = ""  # rollback: a revision number or tag
    everything: bool = False  # a removal of / may empty the repository
    dry_run: bool = False


def change_path(
    location: str, change: PathChange, *, keydir: Path | None = None, token: str | None = None
) -> Committed:
    """Make (or, dry run, preview) the revision that change asks for."""
    try:
        change = PathChange(**{**change.__dict__, "path": normalize(change.path)})
    except FormatError as exc:
        raise BuildError(str(exc)) from exc
    if is_url(location):
        return _over_http(location, change, token)
    repo = open_repository(location, keydir)
    author = revisions.Author.local("cvmbuild")
    if change.kind == revisions.ROLLBACK:
        new = operations.rollback(
            repo,
            change.to,
            author,
            path=change.path,
            message=change.message or None,
            dry_run=change.dry_run,
        ).result
    else:
        intent = revisions.Intent(
            revisions.REMOVE,
            change.path,
            change.message or f"remove {change.path}",
            everything=change.everything,
            dry_run=change.dry_run,
        )
        with repo.lock():
            new = revisions.remove_path(repo, intent, author)
    return Committed(new.revision, new.new_bytes, new.changes, new.refusals)


def _over_http(location: str, change: PathChange, token: str | None) -> Committed:
    if not token:
        raise BuildError(
            f"{location}: changing a repository over HTTP needs a token (--token-file FILE "
            "or CVMBUILD_TOKEN)"
        )
    from cvmbuild import remote

    gateway = remote.Gateway(location, token)
    ask: dict[str, object] = {"operation": change.kind, "message": change.message}
    if change.kind == revisions.ROLLBACK:
        ask["to"] = change.to
    else:
        ask["message"] = change.message or f"remove {change.path}"
        ask["everything"] = change.everything
    with gateway.lease(change.path, dry_run=change.dry_run) as lease:
        return committed(remote.commit(gateway, lease, ask, dry_run=change.dry_run))


def report(change: PathChange, done: Committed) -> list[str]:
    """What to print: one summary line, then the changes."""
    what = (
        f"{change.path} removed"
        if change.kind == revisions.REMOVE
        else f"{change.path} rolled back to revision {change.to}"
    )
    if change.dry_run:
        lines = [f"dry run, nothing changed: revision {done.revision} would have {what}"]
        lines += [f"  {text}" for text in done.changes.lines(would=True)]
        return lines + [f"  would be refused: {why}" for why in done.refusals]
    return [f"published revision {done.revision}: {what}"] + [
        f"  {text}" for text in done.changes.lines()
    ]


__all__ = ["Changes", "PathChange", "change_path", "report"]
