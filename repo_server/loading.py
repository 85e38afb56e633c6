"""The one place the server side loads a catalog or the history from storage: checked
against the hash and stored size that name it, read once more before it is called
corrupt (a storage may serve a torn or stale read), as restic's LoadRaw does.

check, info, gc, graft, diff, rollback, the publish API's validation and replicate all
load through here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Protocol, TypeVar

from cvmfs_format.catalog import Catalog
from cvmfs_format.errors import VerificationError
from cvmfs_format.history import History
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import ObjectRef, verify_stored
from cvmfs_format.store import ObjectSource
from repo_server.errors import ObjectMissing

T = TypeVar("T")


class Readable(Protocol):
    """A repository as check reads it: a LocalRepository, or one pinned by its public
    key (repo_server.pinned)."""

    @property
    def location(self) -> str: ...
    @property
    def storage(self) -> ObjectSource: ...
    def head(self) -> Manifest: ...
    def head_unverified(self) -> Manifest: ...
    def history(self, manifest: Manifest) -> History: ...


def _load(
    storage: ObjectSource, digest: str, use: Callable[[bytes], T], max_bytes: int | None = None
) -> T:
    """use(the stored bytes of digest); on a VerificationError read once more."""
    for attempt in (1, 2):
        try:
            stored = storage.get_object(digest, max_bytes)
        except FileNotFoundError as exc:
            raise ObjectMissing(f"object {digest}: missing from the repository") from exc
        try:
            return use(stored)
        except VerificationError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def load_verified(storage: ObjectSource, ref: ObjectRef) -> bytes:
    """The verified content of the object ref names; ObjectMissing if storage lacks it,
    VerificationError if both reads of it fail verification."""
    return _load(storage, ref.digest, ref.decode, ref.max_stored)


def load_catalog(storage: ObjectSource, ref: ObjectRef) -> Catalog:
    """A catalog, verified; the caller closes it."""
    return Catalog.from_bytes(load_verified(storage, ref), ref.digest)


def load_history(storage: ObjectSource, ref: ObjectRef) -> History:
    return History(load_verified(storage, ref), ref.digest)


def load_catalog_file(
    storage: ObjectSource, digest: str, stored_size: int | None, directory: str
) -> tuple[Catalog, int]:
    """A catalog verified into a file in directory, so that its content (up to 256 times
    its stored size) is never whole in memory, and its stored size. stored_size None:
    nothing names it yet (the top catalog of an upload)."""
    filename = os.path.join(directory, digest)

    def verify_into_file(stored: bytes) -> tuple[Catalog, int]:
        if stored_size is not None and len(stored) != stored_size:
            raise VerificationError(
                f"object {digest}: stored size {len(stored)}, expected {stored_size}"
            )
        if not os.path.exists(filename):  # verified into this directory before
            try:
                with open(filename, "wb") as out:
                    verify_stored(stored, digest, sink=out.write)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(filename)
                raise
        return Catalog.from_file(filename, digest), len(stored)

    return _load(storage, digest, verify_into_file)
