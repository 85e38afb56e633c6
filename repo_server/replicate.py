"""`repo-server replicate`: make or update a verified mirror (a CernVM-FS "Stratum 1") of
a repository served over HTTP; objects first, whitelist and manifest last.

Every fetched byte is verified against the hash chain that ends in the manifest signed
under the pinned master key (docs/FORMAT.md, "Verification"), so a mirror is as
trustworthy as its source, and a mirror stopped at any moment still serves its previous
revision (docs/OPERATING.md, "Mirrors (Stratum 1)"). With repair, what the mirror holds
is verified too, and what fails is moved to its quarantine and fetched again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvmfs_client import network
from cvmfs_client.fetcher import CurlFetcher, DeadlinePassed
from cvmfs_format import manifest as manifest_mod
from cvmfs_format.catalog import Catalog
from cvmfs_format.errors import CvmfsError, NotFoundError, VerificationError
from cvmfs_format.history import History
from cvmfs_format.manifest import MANIFEST_FILE, Manifest
from cvmfs_format.objects import ObjectRef
from cvmfs_format.signed import MAX_DOCUMENT_SIZE
from cvmfs_format.trust import Floor, TrustedState
from cvmfs_format.whitelist import WHITELIST_FILE
from repo_server.check import catalog_objects
from repo_server.damage import quarantine_corrupt
from repo_server.errors import RepoError
from repo_server.loading import load_verified
from repo_server.mirror_workers import failing_batch, fetch_batch, on_workers, parallel
from repo_server.pinned import http_fetcher
from repo_server.repository import LOCK_FILE
from repo_server.storage import QUARANTINE_DIR, LocalStorage

DEFAULT_WORKERS = 8
DEFAULT_TIMEOUT_S = 3600.0  # the whole run; what was fetched stays for the next run

R = TypeVar("R")


@dataclass(frozen=True)
class ReplicaReport:
    name: str
    revision: int
    previous: int | None  # the mirror's revision before this run (None: a new mirror)
    mirrored: list[int]  # revisions whose objects the mirror now holds
    skipped: list[int]  # untagged revisions whose objects the source no longer has
    objects: int  # objects fetched (and verified, and stored)
    bytes: int  # their stored bytes
    seconds: float
    repaired: list[str] = field(default_factory=list)  # quarantined copies, fetched again


@dataclass
class _Counters:
    objects: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, objects: int, stored: int) -> None:
        with self.lock:
            self.objects += objects
            self.bytes += stored


def replicate(
    url: str,
    mirror_dir: Path,
    master_key: Ed25519PublicKey,
    name: str,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    clock: Callable[[], float] = time.time,
    repair: bool = False,
    ca_bundle: str | None = None,
) -> ReplicaReport:
    """Bring mirror_dir up to the source's verified head revision and tagged revisions,
    within timeout seconds (the mirror lock is never held longer); with repair, verify
    what the mirror holds as well and fetch again what fails."""
    if workers < 1:
        raise RepoError("--workers must be at least 1")
    if timeout <= 0:
        raise RepoError("--timeout must be more than 0 seconds")
    start = time.monotonic()
    source = http_fetcher(url, start + timeout, ca_bundle)
    mirror_dir = _prepare_directory(Path(mirror_dir))
    storage = LocalStorage(mirror_dir)
    with _mirror_lock(mirror_dir):
        storage.create_layout()
        storage.begin_writes()
        old_data = storage.read_file(MANIFEST_FILE)
        current = manifest_mod.parse(old_data)[0] if old_data is not None else None
        floor = Floor(current.revision, current.root_hash) if current else Floor()
        if current is not None and current.name != name:
            raise RepoError(
                f"the mirror {mirror_dir} holds repository {current.name!r}, not {name!r}; "
                "mirror it into another directory"
            )
        trust = TrustedState(master_key, name, floor)
        try:
            job = _Replication(source, storage, workers, progress, repair)
            report = job.run(trust, old_data, clock())
        except DeadlinePassed as exc:
            still = f"still revision {current.revision}" if current else "no revision yet"
            raise RepoError(
                f"{url}: not done within --timeout {timeout:g} s ({exc}); the mirror "
                f"{mirror_dir} is unchanged ({still}) and keeps what was fetched: run "
                "replicate again, or give a longer --timeout"
            ) from exc
        except CvmfsError as exc:
            still = f"still revision {current.revision}" if current else "no revision yet"
            raise RepoError(f"{exc}; the mirror {mirror_dir} is unchanged ({still})") from exc
        storage.end_writes()
    return ReplicaReport(
        report.name,
        report.revision,
        current.revision if current else None,
        report.mirrored,
        report.skipped,
        job.counters.objects,
        job.counters.bytes,
        time.monotonic() - start,
        job.repaired,
    )


def _prepare_directory(mirror_dir: Path) -> Path:
    mirror_dir = mirror_dir.resolve()
    if mirror_dir.exists():
        if not mirror_dir.is_dir():
            raise RepoError(f"{mirror_dir}: not a directory; give a new or empty directory")
        names = set(os.listdir(mirror_dir))
        if MANIFEST_FILE not in names and names - {LOCK_FILE, "data", "txn", QUARANTINE_DIR}:
            raise RepoError(
                f"{mirror_dir}: holds other files and is not a mirror; "
                "give a new or empty directory"
            )
    mirror_dir.mkdir(parents=True, exist_ok=True)
    return mirror_dir


@contextlib.contextmanager
def _mirror_lock(mirror_dir: Path) -> Iterator[None]:
    """One replicate per mirror at a time. It fails rather than waits: replicate runs
    from cron, and the next run picks up whatever the running one does not."""
    fd = os.open(mirror_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepoError(
                f"{mirror_dir}: another replicate or publish is writing to it; "
                "try again when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Outcome:
    name: str
    revision: int
    mirrored: list[int]
    skipped: list[int]


class _Replication:
    """One run: fetch what the mirror lacks, verified, then the whitelist and manifest."""

    def __init__(
        self,
        source: CurlFetcher,
        storage: LocalStorage,
        workers: int,
        progress: bool,
        repair: bool = False,
    ):
        self.source = source
        self.storage = storage
        self.workers = workers
        self.progress = progress
        self.repair = repair
        self.repaired: list[str] = []
        self._repairing = threading.Lock()
        self.counters = _Counters()
        self.seen_catalogs: set[str] = set()
        self.have: set[str] = set()  # objects known to be in the mirror

    def run(self, trust: TrustedState, old: bytes | None, now: float) -> _Outcome:
        try:
            wl_data = self.source.fetch(
                WHITELIST_FILE, MAX_DOCUMENT_SIZE, lambda d: (trust.update_whitelist(d, now), d)[1]
            )
        except NotFoundError as exc:
            raise network.not_a_repository(self.source.describe(), str(exc)) from exc
        data = self.source.fetch(
            MANIFEST_FILE, MAX_DOCUMENT_SIZE, lambda d: (trust.update_manifest(d, now), d)[1]
        )
        manifest = trust.manifest
        assert manifest is not None
        mirrored: list[int] = []
        skipped: list[int] = []
        # An unchanged manifest names only what the mirror already has (unless repairing).
        if data != old or self.repair:
            mirrored, skipped = self._mirror_revisions(manifest)
        if wl_data != self.storage.read_file(WHITELIST_FILE) or data != old:
            self.storage.sync()  # everything the manifest names is durable before it appears
            # Whitelist first: during a key rotation it lists the old and the new key,
            # so both the mirror's old manifest and the new one verify against it.
            self.storage.write_file(WHITELIST_FILE, wl_data)
            self.storage.write_file(MANIFEST_FILE, data)
        return _Outcome(manifest.name, manifest.revision, mirrored, skipped)

    def _mirror_revisions(self, manifest: Manifest) -> tuple[list[int], list[int]]:
        history_ref = ObjectRef.catalog(manifest.history_hash, manifest.history_size)
        history_stored, history_content = self._load(history_ref)
        history = History(history_content, manifest.history_hash)
        tagged = {t.revision for t in history.tags()}
        roots = {
            r.revision: ObjectRef.catalog(r.root_hash, r.root_size) for r in history.revisions()
        }
        roots[manifest.revision] = ObjectRef.catalog(manifest.root_hash, manifest.root_size)
        required = tagged | {manifest.revision}
        missing_tags = sorted(tagged - roots.keys())
        if missing_tags:
            raise RepoError(
                f"the source's history tags revisions {missing_tags} that it does not list; "
                "run `repo-server check` on the source"
            )
        # The revisions a client must find first, newest first; then the rest, which
        # the source may have garbage-collected.
        order = sorted(required, reverse=True) + sorted(roots.keys() - required, reverse=True)
        mirrored: list[int] = []
        skipped: list[int] = []
        for number in order:
            try:
                self._mirror_tree(roots[number], f"revision {number}")
            except NotFoundError as exc:
                if number in required:
                    what = "head" if number == manifest.revision else "tagged"
                    raise RepoError(
                        f"{what} revision {number}: {exc}; the source is incomplete "
                        "(run `repo-server check` on it)"
                    ) from exc
                skipped.append(number)
            else:
                mirrored.append(number)
        if history_stored is not None:
            self._store(history_ref, history_stored)
        return sorted(mirrored), sorted(skipped)

    def _mirror_tree(self, root: ObjectRef, label: str) -> None:
        """Every catalog below root and every object they name, in the mirror. Catalogs
        are stored after the objects they name, so a catalog in the mirror is never
        ahead of its files (the walk reads stored catalogs again on every run anyway)."""
        objects: dict[str, int] = {}
        fetched_catalogs: list[tuple[ObjectRef, bytes]] = []
        frontier = [root] if root.digest not in self.seen_catalogs else []
        while frontier:
            self.seen_catalogs.update(ref.digest for ref in frontier)
            following: dict[str, ObjectRef] = {}
            for ref, (stored, content) in zip(
                frontier, parallel(self._load, frontier, self.workers), strict=True
            ):
                if stored is not None:
                    fetched_catalogs.append((ref, stored))
                catalog = Catalog.from_bytes(content, ref.digest)
                try:
                    objects.update(catalog_objects(catalog))
                    for nested in catalog.nested.values():
                        if nested.hash not in self.seen_catalogs:
                            following[nested.hash] = ObjectRef.catalog(nested.hash, nested.size)
                finally:
                    catalog.close()
            frontier = list(following.values())
        wanted = objects.keys() - self.have
        missing = self.storage.missing(wanted)
        if self.repair:
            present = [ObjectRef(d, objects[d]) for d in sorted(wanted - missing)]
            missing |= self._quarantine_failing(present, f"verifying {label}")
        self.have.update(wanted - missing)
        refs = [ObjectRef(d, objects[d]) for d in sorted(missing)]
        self._fetch_objects(refs, label)
        for ref, stored in fetched_catalogs:
            self._store(ref, stored)

    def _load(self, ref: ObjectRef) -> tuple[bytes | None, bytes]:
        """(stored bytes if fetched now, content) of a catalog or the history, read from
        the mirror when it has it (repairing: when it has it intact)."""
        if self.storage.has(ref.digest):
            try:
                return None, load_verified(self.storage, ref)
            except VerificationError:
                if not self.repair:
                    raise
                self._quarantine({ref.digest: None})
        stored = self.source.fetch(ref.path, ref.max_stored, lambda data: data)
        return stored, ref.decode(stored)

    def _fetch_objects(self, refs: list[ObjectRef], label: str) -> None:
        """Fetch, verify and store the files and chunks."""

        def fetched(batch: list[ObjectRef], counts: tuple[int, int]) -> None:
            self.counters.add(*counts)
            self.have.update(ref.digest for ref in batch)

        self._on_workers(fetch_batch, refs, label, fetched)

    def _quarantine_failing(self, refs: list[ObjectRef], label: str) -> set[str]:
        """Move the objects of refs that fail verification in the mirror to its
        quarantine; their digests, to fetch again."""
        failing: dict[str, int | None] = {}

        def verified(batch: list[ObjectRef], digests: list[str]) -> None:
            sizes = {ref.digest: ref.size for ref in batch}
            failing.update((digest, sizes[digest]) for digest in digests)

        self._on_workers(failing_batch, refs, label, verified)
        self._quarantine(failing)
        return set(failing)

    def _quarantine(self, corrupt: dict[str, int | None]) -> None:
        """Move corrupt objects of the mirror away (each verified once more first), so
        that the copy fetched from the source can take their place."""
        moved = quarantine_corrupt(self.storage, corrupt)
        with self._repairing:
            self.repaired += moved

    def _on_workers(
        self,
        work: Callable[[CurlFetcher, str, list[ObjectRef]], R],
        refs: list[ObjectRef],
        label: str,
        done: Callable[[list[ObjectRef], R], None],
    ) -> None:
        root = str(self.storage.root)
        on_workers(
            work, self.source, root, refs, done,
            workers=self.workers, label=label, progress=self.progress,
        )  # fmt: skip

    def _store(self, ref: ObjectRef, stored: bytes) -> None:
        if self.storage.put_object(ref.digest, stored):
            self.counters.add(1, len(stored))
        self.have.add(ref.digest)
