"""The one place the server side loads a catalog or the history from storage: checked
against the hash and stored size that name it, read once more before it is called
corrupt (a storage may serve a torn or stale read), as restic's LoadRaw does.

check, info, gc, graft, diff, rollback, the publish API's validation and replicate all
load through here.
"""

from __future__ import annotations

from cvmfs_format.catalog import Catalog
from cvmfs_format.errors import VerificationError
from cvmfs_format.history import History
from cvmfs_format.objects import ObjectRef
from cvmfs_format.store import Storage
from repo_server.errors import ObjectMissing


def load_verified(storage: Storage, ref: ObjectRef) -> bytes:
    """The verified content of the object ref names; ObjectMissing if storage lacks it,
    VerificationError if both reads of it fail verification."""
    for attempt in (1, 2):
        try:
            stored = storage.get_object(ref.digest)
        except FileNotFoundError as exc:
            raise ObjectMissing(f"object {ref.digest}: missing from the repository") from exc
        try:
            return ref.decode(stored)
        except VerificationError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def load_catalog(storage: Storage, ref: ObjectRef) -> Catalog:
    """A catalog, verified; the caller closes it."""
    return Catalog.from_bytes(load_verified(storage, ref), ref.digest)


def load_history(storage: Storage, ref: ObjectRef) -> History:
    return History(load_verified(storage, ref), ref.digest)
