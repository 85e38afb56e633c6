"""Where objects and the top-level files live, as the format's writers and readers see
it: one small protocol; repo_server has the local-directory and S3 implementations,
cvmbuild the upload and dry-run ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol


class ObjectSink(Protocol):
    """Where a publisher puts objects: a storage, or uploads to a repo-server."""

    def has(self, digest: str) -> bool: ...
    def missing(self, digests: Iterable[str]) -> set[str]: ...
    def put_object(self, digest: str, stored: bytes) -> bool:
        """Store an object unless present; True if it was written now."""
        ...


class ObjectSource(Protocol):
    """Where a reader of a repository gets its objects and top-level files: a storage,
    or a repository read over HTTP (`repo-server check URL`)."""

    def get_object(self, digest: str, max_bytes: int | None = None) -> bytes:
        """The stored bytes of an object (FileNotFoundError if it is not there); a
        source that downloads refuses more than max_bytes (the endless-data defence)."""
        ...

    def read_file(self, name: str) -> bytes | None: ...


class Storage(ObjectSink, ObjectSource, Protocol):
    def object_head(self, digest: str, length: int) -> tuple[bytes, int]:
        """The first `length` stored bytes of an object and its stored size, without
        reading the rest (FileNotFoundError if it is not stored)."""
        ...

    def iter_objects(self) -> Iterator[tuple[str, int]]: ...
    def delete_object(self, digest: str) -> None: ...
    def quarantine_object(self, digest: str) -> str:
        """Move a damaged object out of what is served, keeping it; where it went."""
        ...

    def object_mtime(self, digest: str) -> float:
        """When the object was last written (Unix time): gc spares recent ones."""
        ...

    def write_file(self, name: str, data: bytes) -> None:
        """Atomically replace a top-level file (manifest, whitelist), durably."""
        ...

    def sync(self) -> None:
        """Make every object written so far durable."""
        ...

    def begin_writes(self) -> None: ...
    def end_writes(self) -> None: ...

    temporaries_removed: int  # by this object's sweeps, begin_writes' included

    def sweep_temporaries(self, older_than: float) -> tuple[int, int]:
        """Remove writers' temporary files older than older_than seconds, or whose
        writer is gone: (removed, others left)."""
        ...
