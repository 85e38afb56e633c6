"""`cvmbuild publish`: a build tree becomes one new signed revision at a prefix."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from cvmbuild.ingest import DEFAULT_LEVEL, ChunkPolicy, FileContent, Ingestor
from cvmbuild.layout import DEFAULT_MAX_ENTRIES, build_catalogs
from cvmbuild.scan import SourceEntry, scan
from cvmbuild.statcache import StatCache
from cvmfs_client.console import human
from cvmfs_client.paths import normalize
from repo_server.repository import LocalRepository, open_repository


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

    def line(self) -> str:
        dedup = 100.0 * (1 - self.new_raw_bytes / self.bytes) if self.bytes else 100.0
        return (
            f"published revision {self.revision} at {self.path}: {self.files} files, "
            f"{human(self.bytes)}; new {human(self.new_stored_bytes)} stored "
            f"({self.objects_written} objects, {self.catalogs_written} catalogs); "
            f"dedup {dedup:.1f}% already stored; {self.seconds:.1f} s"
        )


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def publish(
    src: str, repo_dir: str, prefix: str, options: PublishOptions = PublishOptions()
) -> PublishSummary:
    start = time.monotonic()
    prefix = normalize(prefix)
    repo = open_repository(repo_dir, options.keydir)
    compressor = zstandard.ZstdCompressor(level=options.level)
    with repo.lock():
        repo.head()  # fail before any work if keys or signatures are wrong
        entries = scan(src, skip_special=options.skip_special, warn=_warn)
        cache = StatCache(str(repo.root), prefix, src)
        contents, to_read = _reuse_from_cache(repo, cache, entries)
        ingestor = Ingestor(
            repo.storage,
            level=options.level,
            policy=options.chunking,
            workers=options.workers,
        )
        with _progress(options.progress, sum(e.size for e in to_read)) as advance:
            ingestor.progress = advance
            contents.update(ingestor.ingest(to_read))
        layout = build_catalogs(
            repo.storage,
            prefix,
            entries,
            contents,
            compressor=compressor,
            previous=cache.catalogs,
            max_entries=options.max_entries,
            warn=_warn,
        )
        result = repo.commit(
            layout.subtree, message=options.message, tag=options.tag, compressor=compressor
        )
        cache.save(entries, contents, layout.catalogs)
    files = [e for e in entries if e.is_file]
    return PublishSummary(
        revision=result.manifest.revision,
        path=prefix,
        files=len(files),
        bytes=sum(e.size for e in files),
        new_raw_bytes=ingestor.stats.raw_bytes,
        new_stored_bytes=ingestor.stats.stored_bytes + layout.new_bytes + result.new_bytes,
        objects_written=ingestor.stats.objects_written,
        catalogs_written=layout.catalogs_written,
        seconds=time.monotonic() - start,
    )


def _reuse_from_cache(
    repo: LocalRepository, cache: StatCache, entries: list[SourceEntry]
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
    missing = repo.storage.missing(needed)
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
