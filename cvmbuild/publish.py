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
from typing import TYPE_CHECKING

import zstandard

from cvmbuild.chunking import ChunkPolicy
from cvmbuild.errors import BuildError
from cvmbuild.ingest import DEFAULT_LEVEL, FileContent, Ingestor
from cvmbuild.layout import DEFAULT_MAX_ENTRIES, build_catalogs
from cvmbuild.scan import SourceEntry, scan
from cvmbuild.statcache import StatCache
from cvmfs_client.console import human
from cvmfs_format.catalog_writer import Subtree
from cvmfs_format.objects import verify_stored
from cvmfs_format.paths import normalize
from cvmfs_format.store import ObjectSink
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
    dry_run: bool = False  # show what would be uploaded; change nothing
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

    def line(self) -> str:
        dedup = 100.0 * (1 - self.new_raw_bytes / self.bytes) if self.bytes else 100.0
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


class _LocalSession:
    """Publishing straight into a repository directory, holding its lock."""

    def __init__(self, repo: LocalRepository):
        self.repo = repo
        self.storage: ObjectSink = repo.storage

    def commit(
        self, subtree: Subtree, options: PublishOptions, compressor: zstandard.ZstdCompressor
    ) -> tuple[int, int]:
        result = self.repo.commit(
            subtree, message=options.message, tag=options.tag, compressor=compressor
        )
        return result.manifest.revision, result.new_bytes


class _RemoteSession:
    """Publishing to a repo-server, holding a lease on the prefix."""

    def __init__(self, gateway: remote.Gateway, lease: str):
        from cvmbuild import remote

        self.gateway = gateway
        self.lease = lease
        self.storage = remote.UploadStorage(gateway, lease)

    def commit(
        self, subtree: Subtree, options: PublishOptions, compressor: zstandard.ZstdCompressor
    ) -> tuple[int, int]:
        self.storage.flush()
        from cvmbuild import remote

        return remote.commit(self.gateway, self.lease, subtree, options.message, options.tag)


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


class _DryRunSession:
    def __init__(self, lookup: Callable[[Iterable[str]], set[str]]):
        self.storage = DryRunSink(lookup)

    def commit(
        self, subtree: Subtree, options: PublishOptions, compressor: zstandard.ZstdCompressor
    ) -> tuple[int, int]:
        return 0, 0


Session = _LocalSession | _RemoteSession | _DryRunSession


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


@contextlib.contextmanager
def _session(location: str, prefix: str, options: PublishOptions) -> Iterator[Session]:
    if is_url(location):
        if not options.token:
            raise BuildError(
                f"{location}: publishing over HTTP needs a token "
                "(--token-file FILE or CVMBUILD_TOKEN; the operator makes one with "
                "`repo-server token add`)"
            )
        from cvmbuild import remote  # requests costs 0.15 s to import: only when needed

        gateway = remote.Gateway(location, options.token)
        if options.dry_run:
            yield _DryRunSession(gateway.missing)
            return
        with gateway.lease(prefix) as lease:
            session = _RemoteSession(gateway, lease)
            try:
                yield session
            finally:
                session.storage.close()
        return
    repo = open_repository(location, options.keydir, options.endpoint_url)
    if options.dry_run:
        repo.head()
        yield _DryRunSession(repo.storage.missing)
        return
    with repo.lock():
        repo.head()  # fail before any work if keys or signatures are wrong
        try:
            yield _LocalSession(repo)
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
        with _progress(options.progress, sum(e.size for e in to_read)) as advance:
            ingestor.progress = advance
            ingested = ingestor.ingest(to_read)
        contents.update((relpath, content) for relpath, (_, content) in ingested.items())
        # A file that changed since the scan was read as it is now: describe that.
        entries = [ingested[e.relpath][0] if e.relpath in ingested else e for e in entries]
        layout = build_catalogs(
            session.storage,
            prefix,
            entries,
            contents,
            compressor=compressor,
            previous=cache.catalogs,
            max_entries=options.max_entries,
            warn=_warn,
        )
        revision, commit_bytes = session.commit(layout.subtree, options, compressor)
        if not options.dry_run:
            cache.save(entries, contents, layout.catalogs, written_since=started_ns, warn=_warn)
    files = [e for e in entries if e.is_file]
    return PublishSummary(
        revision=revision,
        path=prefix,
        files=len(files),
        bytes=sum(e.size for e in files),
        new_raw_bytes=ingestor.stats.raw_bytes,
        new_stored_bytes=ingestor.stats.stored_bytes + layout.new_bytes + commit_bytes,
        objects_written=ingestor.stats.objects_written,
        catalogs_written=layout.catalogs_written,
        seconds=time.monotonic() - start,
        dry_run=options.dry_run,
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


class _progress:
    """A byte progress bar on stderr when it is a terminal, else nothing."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and sys.stderr.isatty() and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="publishing", leave=False)

    def __enter__(self) -> Callable[[int], None]:
        return self.bar.update if self.bar is not None else (lambda n: None)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
