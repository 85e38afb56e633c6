"""`cvmbuild publish`: a build tree becomes one new signed revision at a prefix."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zstandard

from cvmbuild.chunking import ChunkPolicy
from cvmbuild.errors import BuildError
from cvmbuild.ingest import DEFAULT_LEVEL, FileContent, Ingestor
from cvmbuild.layout import DEFAULT_MAX_ENTRIES, build_catalogs
from cvmbuild.scan import SourceEntry, scan
from cvmbuild.statcache import StatCache
from cvmfs_client import network
from cvmfs_client.console import human
from cvmfs_client.progress import Progress
from cvmfs_format.catalog_writer import Subtree
from cvmfs_format.objects import verify_stored
from cvmfs_format.paths import normalize
from cvmfs_format.store import ObjectSink
from repo_server import revisions
from repo_server.changes import Changes
from repo_server.repository import LocalRepository, open_repository

if TYPE_CHECKING:
    from cvmbuild import remote


@dataclass(frozen=True)
class PublishOptions:
    tag: str | None = None
    message: str = ""
    keydir: Path | None = None
    level: int = DEFAULT_LEVEL
    skip_special: bool = False
    max_entries: int = DEFAULT_MAX_ENTRIES
    chunking: ChunkPolicy = ChunkPolicy()
    workers: int | None = None
    progress: bool = False
    token: str | None = None  # for an http(s) repository
    endpoint_url: str | None = None  # for an s3:// repository (else AWS_ENDPOINT_URL)
    dry_run: bool = False  # show what would be uploaded and changed; change nothing
    replace: bool = False  # may remove what is below the path but not in the tree
    force_tag: bool = False  # may move an existing tag to the new revision
    ca_bundle: str | None = None  # for an https repository (default: the system's CAs)
    bundle_trace: Path | None = None  # write its prefetch bundles into src first


@dataclass(frozen=True)
class PublishSummary:
    revision: int
    path: str
    files: int
    bytes: int
    new_raw_bytes: int
    new_stored_bytes: int
    objects_written: int
    catalogs_written: int
    seconds: float
    dry_run: bool = False
    changes: Changes = Changes()
    refusals: tuple[str, ...] = ()  # a dry run's: what the publish would refuse

    def details(self) -> list[str]:
        """A dry run's further lines: what would be added, changed, removed, refused."""
        if not self.dry_run:
            return []
        lines = [f"  {text}" for text in self.changes.lines(would=True)]
        return lines + [f"  would be refused: {why}" for why in self.refusals]

    @property
    def dedup_percent(self) -> float:
        """How much of the tree's content was already stored."""
        return 100.0 * (1 - self.new_raw_bytes / self.bytes) if self.bytes else 100.0

    def document(self) -> dict[str, object]:
        """What `publish --json` prints: the line's numbers, in bytes and seconds."""
        return {
            "dry_run": self.dry_run,
            "revision": None if self.dry_run else self.revision,
            "path": self.path,
            "files": self.files,
            "bytes": self.bytes,
            "new_stored_bytes": self.new_stored_bytes,
            "objects_written": self.objects_written,
            "catalogs_written": self.catalogs_written,
            "dedup_percent": round(self.dedup_percent, 1),
            "seconds": round(self.seconds, 3),
            "changes": self.changes.to_json(),
            "refusals": list(self.refusals),
        }

    def line(self) -> str:
        dedup = self.dedup_percent
        if self.dry_run:
            return (
                f"dry run, nothing changed: publishing {self.files} files, "
                f"{human(self.bytes)} at {self.path} would store "
                f"{human(self.new_stored_bytes)} ({self.objects_written} objects, "
                f"{self.catalogs_written} catalogs); dedup {dedup:.1f}% already stored; "
                f"{self.seconds:.1f} s"
            )
        return (
            f"published revision {self.revision} at {self.path}: {self.files} files, "
            f"{human(self.bytes)}; new {human(self.new_stored_bytes)} stored "
            f"({self.objects_written} objects, {self.catalogs_written} catalogs); "
            f"dedup {dedup:.1f}% already stored; {self.seconds:.1f} s"
        )


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Committed:
    """What a session's commit made, or (a dry run) would make."""

    revision: int
    new_bytes: int
    changes: Changes
    refusals: tuple[str, ...] = ()


def _intent(path: str, options: PublishOptions) -> revisions.Intent:
    return revisions.Intent(
        revisions.PUBLISH,
        path,
        options.message,
        options.tag,
        replace=options.replace,
        force_tag=options.force_tag,
        dry_run=options.dry_run,
    )


class _LocalSession:
    """Publishing straight into a repository directory, holding its lock; or a dry run
    that keeps its catalogs in memory to compare them with the head."""

    def __init__(self, repo: LocalRepository, dry_run: bool):
        self.repo = repo
        self.scratch = revisions.ScratchSink(repo.storage) if dry_run else None
        self.storage: ObjectSink = DryRunSink(repo.storage.missing) if dry_run else repo.storage
        self.catalogs: ObjectSink = self.scratch or repo.storage

    def commit(
        self, subtree: Subtree, options: PublishOptions, compressor: zstandard.ZstdCompressor
    ) -> Committed:
        new = revisions.publish_subtree(
            self.repo,
            subtree,
            _intent(subtree.path, options),
            revisions.Author.local("cvmbuild"),
            compressor=compressor,
            scratch=self.scratch,
        )
        return Committed(new.revision, new.new_bytes, new.changes, new.refusals)


class _RemoteSession:
    """Publishing to a repo-server, holding a lease on the prefix. A dry run uploads
    its catalogs only, for the server to compare with the head."""

    def __init__(self, gateway: remote.Gateway, lease: str, dry_run: bool):
        from cvmbuild import remote

        self.gateway = gateway
        self.lease = lease
        self.uploads = remote.UploadStorage(gateway, lease)
        self.storage: ObjectSink = DryRunSink(gateway.missing) if dry_run else self.uploads
        self.catalogs: ObjectSink = self.uploads

    def commit(
        self, subtree: Subtree, options: PublishOptions, compressor: zstandard.ZstdCompressor
    ) -> Committed:
        from cvmbuild import remote

        self.uploads.flush()
        ask = {
            **remote.subtree_request(subtree),
            "message": options.message,
            "tag": options.tag,
            "replace": options.replace,
            "force_tag": options.force_tag,
        }
        return committed(remote.commit(self.gateway, self.lease, ask, dry_run=options.dry_run))


def committed(answer: dict[str, Any]) -> Committed:
    """A commit's answer from the publish API."""
    changes = Changes.from_json(answer["changes"]) if "changes" in answer else Changes()
    refusals = tuple(str(r) for r in answer.get("refusals", []))
    return Committed(int(answer["revision"]), int(answer["new_bytes"]), changes, refusals)


class DryRunSink:
    """Answers "which are missing" from the real repository; stores nothing."""

    def __init__(self, lookup: Callable[[Iterable[str]], set[str]]):
        self.lookup = lookup
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def has(self, digest: str) -> bool:
        return not self.missing([digest])

    def missing(self, digests: Iterable[str]) -> set[str]:
        wanted = set(digests)
        with self._lock:
            wanted -= self._taken
        return self.lookup(wanted) if wanted else set()

    def put_object(self, digest: str, stored: bytes) -> bool:
        if not self.missing([digest]):  # catalogs are put without asking first
            return False
        verify_stored(stored, digest)  # as a storage would before writing it
        with self._lock:
            new = digest not in self._taken
            self._taken.add(digest)
        return new


Session = _LocalSession | _RemoteSession


@contextlib.contextmanager
def _session(location: str, prefix: str, options: PublishOptions) -> Iterator[Session]:
    network.check_location(location, s3=True)
    if network.is_url(location):
        if not options.token:
            raise BuildError(
                f"{location}: publishing over HTTP needs a token "
                "(--token-file FILE or CVMBUILD_TOKEN; the operator makes one with "
                "`repo-server token add`)"
            )
        from cvmbuild import remote  # requests costs 0.15 s to import: only when needed

        gateway = remote.Gateway(
            location, options.token, ca_bundle=network.ca_bundle(options.ca_bundle)
        )
        with gateway.lease(prefix, dry_run=options.dry_run) as lease:
            session = _RemoteSession(gateway, lease, options.dry_run)
            try:
                yield session
            finally:
                session.uploads.close()
        return
    repo = open_repository(location, options.keydir, options.endpoint_url)
    if options.dry_run:
        repo.head()
        yield _LocalSession(repo, dry_run=True)
        return
    with repo.lock():
        repo.head()  # fail before any work if keys or signatures are wrong
        try:
            yield _LocalSession(repo, dry_run=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            served = repo.head_unverified().revision
            what = os.strerror(exc.errno).lower()
            raise BuildError(
                f"{repo.location}: {what} while publishing; the repository still serves "
                f"revision {served}; free space there and publish again (what this publish "
                "stored is reused)"
            ) from exc


def publish(
    src: str, location: str, prefix: str, options: PublishOptions = PublishOptions()
) -> PublishSummary:
    """Publish src at prefix into the repository at location (a directory or a URL)."""
    start = time.monotonic()
    started_ns = time.time_ns()
    prefix = normalize(prefix)
    compressor = zstandard.ZstdCompressor(level=options.level)
    with _session(location, prefix, options) as session:
        if options.bundle_trace is not None and not options.dry_run:
            from cvmbuild.bundle import make_bundles

            _warn("bundles: " + make_bundles(options.bundle_trace, Path(src), prefix).line())
        entries = scan(src, skip_special=options.skip_special, warn=_warn)
        repo_id = location if "://" in location else str(Path(location).resolve())
        cache = StatCache(repo_id, prefix, src)
        contents, to_read = _reuse_from_cache(session.storage, cache, entries)
        ingestor = Ingestor(
            session.storage,
            level=options.level,
            policy=options.chunking,
            workers=options.workers,
        )
        with Progress("publishing", sum(e.size for e in to_read), enabled=options.progress) as bar:
            ingestor.progress = bar.update
            ingested = ingestor.ingest(to_read)
        contents.update((relpath, content) for relpath, (_, content) in ingested.items())
        # A file that changed since the scan was read as it is now: describe that.
        entries = [ingested[e.relpath][0] if e.relpath in ingested else e for e in entries]
        layout = build_catalogs(
            session.catalogs,
            prefix,
            entries,
            contents,
            compressor=compressor,
            previous=cache.catalogs,
            max_entries=options.max_entries,
            warn=_warn,
        )
        committed = session.commit(layout.subtree, options, compressor)
        if not options.dry_run:
            cache.save(entries, contents, layout.catalogs, written_since=started_ns, warn=_warn)
    files = [e for e in entries if e.is_file]
    return PublishSummary(
        revision=committed.revision,
        path=prefix,
        files=len(files),
        bytes=sum(e.size for e in files),
        new_raw_bytes=ingestor.stats.raw_bytes,
        new_stored_bytes=ingestor.stats.stored_bytes + layout.new_bytes + committed.new_bytes,
        objects_written=ingestor.stats.objects_written,
        catalogs_written=layout.catalogs_written,
        seconds=time.monotonic() - start,
        dry_run=options.dry_run,
        changes=committed.changes,
        refusals=committed.refusals,
    )


def _reuse_from_cache(
    storage: ObjectSink, cache: StatCache, entries: list[SourceEntry]
) -> tuple[dict[str, FileContent], list[SourceEntry]]:
    """Contents known from the stat cache whose objects are all still stored."""
    known: dict[str, FileContent] = {}
    to_read: list[SourceEntry] = []
    for entry in entries:
        if not entry.is_file:
            continue
        hit = cache.lookup(entry)
        if hit is None:
            to_read.append(entry)
        else:
            known[entry.relpath] = hit
    needed = {
        h for c in known.values() for h in ([c.hash] if c.hash else [x.hash for x in c.chunks])
    }
    # The catalogs the layout may reuse go in the same question: over HTTP one request
    # instead of one per catalog (the upload storage remembers the answers).
    needed.update(ref.hash for ref in cache.catalogs.values())
    missing = storage.missing(needed)
    if missing:
        for entry in entries:
            content = known.get(entry.relpath)
            if content and ({content.hash} | {c.hash for c in content.chunks}) & missing:
                del known[entry.relpath]
                to_read.append(entry)
    return known, to_read
