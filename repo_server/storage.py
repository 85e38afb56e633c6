"""Where a repository's files live: one small protocol, a local-directory implementation.

Objects are immutable and written atomically; the manifest and whitelist are the only
files ever replaced, by an atomic rename after everything they name is durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from cvmfs_client.objects import object_path

TXN_DIR = "txn"
TMP_PREFIX = ".tmp-"
DIRTY_MARKER = "dirty"
LIST_DIR_AT = 16  # asked about this many objects of one data/xx/, list it instead of stat
STALE_TMP_S = 600  # an object's temporary file older than this was left by a crash


class ObjectSink(Protocol):
    """Where a publisher puts objects: a storage, or uploads to a repo-server."""

    def has(self, digest: str) -> bool: ...
    def missing(self, digests: Iterable[str]) -> set[str]: ...
    def put_object(self, digest: str, stored: bytes) -> bool:
        """Store an object unless present; True if it was written now."""
        ...


class Storage(ObjectSink, Protocol):

    def get_object(self, digest: str) -> bytes: ...
    def iter_objects(self) -> Iterator[tuple[str, int]]: ...
    def delete_object(self, digest: str) -> None: ...
    def object_mtime(self, digest: str) -> float:
        """When the object was last written (Unix time): gc spares recent ones."""
        ...

    def read_file(self, name: str) -> bytes | None: ...
    def write_file(self, name: str, data: bytes) -> None:
        """Atomically replace a top-level file (manifest, whitelist), durably."""
        ...

    def sync(self) -> None:
        """Make every object written so far durable."""
        ...

    def begin_writes(self) -> None: ...
    def end_writes(self) -> None: ...


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root
        self.txn = root / TXN_DIR

    def create_layout(self) -> None:
        self.txn.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.root / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def begin_writes(self) -> None:
        """Start a publish (under its lock): remove what a killed one left behind.

        Objects are written as `.tmp-*` files beside their final name (a same-directory
        rename, spread over 256 directories); the `dirty` marker says a publish did not
        end cleanly, so only then are the object directories searched for leftovers.
        """
        dirty = os.path.exists(self.txn / DIRTY_MARKER)
        for entry in os.scandir(self.txn):
            os.unlink(entry.path)
        if dirty:
            # Only old ones: the publish API writes objects without this lock, and its
            # temporary files live for milliseconds before their rename.
            stale = time.time() - STALE_TMP_S
            for sub in os.scandir(self.root / "data"):
                if sub.is_dir():
                    for entry in os.scandir(sub.path):
                        if entry.name.startswith(TMP_PREFIX):
                            with contextlib.suppress(FileNotFoundError):
                                if entry.stat().st_mtime < stale:
                                    os.unlink(entry.path)
        (self.txn / DIRTY_MARKER).touch()

    def end_writes(self) -> None:
        try:
            os.unlink(self.txn / DIRTY_MARKER)
        except FileNotFoundError:
            pass

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

    def _write_temp(self, data: bytes, directory: str | None = None) -> str:
        tmp = os.path.join(directory or self.txn, TMP_PREFIX + secrets.token_hex(12))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return tmp

    def put_object(self, digest: str, stored: bytes) -> bool:
        final = self._path(digest)
        if os.path.exists(final):
            return False
        os.rename(self._write_temp(stored, os.path.dirname(final)), final)
        return True

    def get_object(self, digest: str) -> bytes:
        with open(self._path(digest), "rb") as f:
            return f.read()

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

    def object_mtime(self, digest: str) -> float:
        return os.stat(self._path(digest)).st_mtime

    def read_file(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_file(self, name: str, data: bytes) -> None:
        tmp = self._write_temp(data)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.root / name)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

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
