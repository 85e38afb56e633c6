"""A repository's files in a local directory (the Storage protocol of cvmfs_format.store).

Objects are immutable and written atomically; the manifest and whitelist are the only
files ever replaced, by an atomic rename after everything they name is durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cvmfs_format.durable import TMP_PREFIX, sync_directory, write_atomic, writer_is_gone
from cvmfs_format.objects import object_path, verify_stored

TXN_DIR = "txn"
QUARANTINE_DIR = "quarantine"  # objects `check --repair` found damaged, kept for inspection
DIRTY_MARKER = "dirty"
LIST_DIR_AT = 16  # asked about this many objects of one data/xx/, list it instead of stat
STALE_TMP_S = 600  # an object's temporary file older than this was left by a crash


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root
        self.txn = root / TXN_DIR
        self._marked = False  # this process has said it may leave temporary files
        self._young_leftovers = 0
        self.temporaries_removed = 0  # by this object's sweeps, for gc's report

    def create_layout(self) -> None:
        self.txn.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.root / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def begin_writes(self) -> None:
        """Start a publish (under its lock): remove what a killed writer left behind.

        Objects are written as `.tmp-*` files beside their final name (a same-directory
        rename, spread over 256 directories); the `dirty` marker says a writer did not
        end cleanly, so only then are the directories searched for leftovers. The
        marker stays until a sweep found none left, so a leftover too young to remove
        now is removed by a later publish (or by gc).
        """
        self.txn.mkdir(exist_ok=True)
        dirty = os.path.exists(self.txn / DIRTY_MARKER)
        for entry in os.scandir(self.txn):
            if entry.name != DIRTY_MARKER:
                os.unlink(entry.path)
        self._young_leftovers = self.sweep_temporaries(STALE_TMP_S)[1] if dirty else 0
        self._mark_dirty()

    def end_writes(self) -> None:
        if self._young_leftovers:
            return  # the next publish sweeps again
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.txn / DIRTY_MARKER)
        self._marked = False

    def _mark_dirty(self) -> None:
        """Say that temporary files may be left if this process dies (once per writer:
        the publish API writes objects without the publish lock)."""
        if not self._marked:
            (self.txn / DIRTY_MARKER).touch()
            self._marked = True

    def sweep_temporaries(self, older_than: float) -> tuple[int, int]:
        """Remove writers' temporary files older than older_than seconds or left by a
        process of this host that is gone; returns (removed, others left). The others
        may belong to a writer at work: the publish API writes without the lock."""
        stale = time.time() - older_than
        removed = left = 0
        directories = [str(self.root)]
        with os.scandir(self.root / "data") as subs:
            directories += [sub.path for sub in subs if sub.is_dir()]
        for directory in directories:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.name.startswith(TMP_PREFIX):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        old = entry.stat(follow_symlinks=False).st_mtime < stale
                        if old or writer_is_gone(entry.name):
                            os.unlink(entry.path)
                            removed += 1
                        else:
                            left += 1
        self.temporaries_removed += removed
        return removed, left

    def _path(self, digest: str) -> str:
        return os.path.join(self.root, object_path(digest))

    def has(self, digest: str) -> bool:
        return os.path.exists(self._path(digest))

    def missing(self, digests: Iterable[str]) -> set[str]:
        by_dir: dict[str, list[str]] = {}
        for digest in set(digests):
            object_path(digest)  # refuses anything that is not an object name
            by_dir.setdefault(digest[:2], []).append(digest)
        missing: set[str] = set()
        for sub, wanted in by_dir.items():
            directory = os.path.join(self.root, "data", sub)
            if len(wanted) < LIST_DIR_AT:
                missing.update(d for d in wanted if not os.path.exists(f"{directory}/{d[2:]}"))
                continue
            # Many in one directory (a re-publish asks about every object): one listing
            # is cheaper than a stat each (15k objects: 0.35 s of stats).
            try:
                present = set(os.listdir(directory))
            except FileNotFoundError:
                present = set()
            missing.update(d for d in wanted if d[2:] not in present)
        return missing

    def put_object(self, digest: str, stored: bytes) -> bool:
        final = self._path(digest)
        if os.path.exists(final):
            return False
        verify_stored(stored, digest)  # never store bytes under a name they do not have
        self._mark_dirty()
        # Not durable one by one: sync() makes every object durable before a manifest
        # names any of them (docs/FORMAT.md, "Publishing"). A rename, not a link: two
        # writers of one object write the same verified bytes, and link + unlink cost
        # a fifth of a cold publish.
        write_atomic(final, stored, durable=False)
        return True

    def get_object(self, digest: str, max_bytes: int | None = None) -> bytes:
        # A local file is as large as it is: the caller checks its size against its name.
        with open(self._path(digest), "rb") as f:
            return f.read()

    def object_head(self, digest: str, length: int) -> tuple[bytes, int]:
        with open(self._path(digest), "rb") as f:
            return f.read(length), os.fstat(f.fileno()).st_size

    def iter_objects(self) -> Iterator[tuple[str, int]]:
        data = self.root / "data"
        for sub in sorted(os.scandir(data), key=lambda e: e.name):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if not entry.name.startswith(TMP_PREFIX):
                    yield sub.name + entry.name, entry.stat().st_size

    def delete_object(self, digest: str) -> None:
        os.unlink(self._path(digest))

    def quarantine_object(self, digest: str) -> str:
        """Move an object to quarantine/ (served by nothing; see docs/OPERATING.md,
        "Repairing damage"): a publish then finds it missing and stores it again."""
        directory = self.root / QUARANTINE_DIR
        directory.mkdir(exist_ok=True)
        target = directory / digest
        n = 1
        while target.exists():  # damaged again after an earlier repair: keep both
            target, n = directory / f"{digest}.{n}", n + 1
        os.rename(self._path(digest), target)
        sync_directory(directory)
        sync_directory(os.path.dirname(self._path(digest)))
        return str(target)

    def object_mtime(self, digest: str) -> float:
        return os.stat(self._path(digest)).st_mtime

    def read_file(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_file(self, name: str, data: bytes) -> None:
        write_atomic(self.root / name, data)

    def sync(self) -> None:
        # One syncfs of the repository's file system is far cheaper than an fsync per
        # object, and unlike sync(2) it does not wait for unrelated file systems.
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _libc_syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


def _libc_syncfs(fd: int) -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syncfs(fd))
    except (OSError, AttributeError):
        return -1
