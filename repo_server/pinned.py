"""A repository read as its clients read it: pinned by the master public key and its
name, from a directory or over HTTP, without a key directory. What `repo-server check
DIR|URL --key PUB` checks: a mirror, or a repository on another host.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvmfs_client import network
from cvmfs_client.network import is_url as is_url
from cvmfs_format import manifest as manifest_mod
from cvmfs_format.errors import NotFoundError
from cvmfs_format.history import History
from cvmfs_format.manifest import MANIFEST_FILE, Manifest
from cvmfs_format.objects import ObjectRef, object_path
from cvmfs_format.pack import OBJECT_LIMIT
from cvmfs_format.signed import MAX_DOCUMENT_SIZE
from cvmfs_format.store import ObjectSource
from cvmfs_format.trust import TrustedState, pinned_name
from cvmfs_format.whitelist import WHITELIST_FILE
from repo_server import keys
from repo_server.errors import RepoError
from repo_server.loading import load_history
from repo_server.storage import LocalStorage

if TYPE_CHECKING:  # pycurl is imported only by the commands that read over HTTP
    from cvmfs_client.fetcher import CurlFetcher, Fetcher

SOURCE_TIMEOUT_S = 60.0  # one request (a source slower than 1 KiB/s for 10 s is cut off)


def read_trusted(
    source: ObjectSource, master_key: Ed25519PublicKey, name: str, now: float
) -> TrustedState:
    """The whitelist and manifest of source, accepted as a client accepts them."""
    trust = TrustedState(master_key, name)
    trust.update_whitelist(source.read_file(WHITELIST_FILE) or b"", now)
    trust.update_manifest(source.read_file(MANIFEST_FILE) or b"", now)
    return trust


def _as_is(data: bytes) -> bytes:
    return data  # verified by the caller, which knows what the bytes must be


class FetchedObjects:
    """The read half of a storage over a Fetcher: the client's GET stack with its size
    bounds, low-speed cut-off and retries."""

    def __init__(self, fetcher: Fetcher):
        self.fetcher = fetcher

    def get_object(self, digest: str, max_bytes: int | None = None) -> bytes:
        limit = OBJECT_LIMIT if max_bytes is None else max_bytes
        try:
            return self.fetcher.fetch(object_path(digest), limit, _as_is)
        except NotFoundError as exc:
            # As a missing file is for a directory: check reports it as "missing".
            raise FileNotFoundError(errno.ENOENT, str(exc)) from exc

    def read_file(self, name: str) -> bytes | None:
        try:
            return self.fetcher.fetch(name, MAX_DOCUMENT_SIZE, _as_is)
        except NotFoundError:
            return None


class ReadsHead:
    """The head and history of a repository that can say which manifest it trusts
    (trust()): shared by a local repository and a pinned one read over HTTP."""

    storage: ObjectSource

    def trust(self) -> TrustedState:
        raise NotImplementedError

    def head(self) -> Manifest:
        """The current manifest, verified as a client verifies it."""
        manifest = self.trust().manifest
        assert manifest is not None
        return manifest

    def head_unverified(self) -> Manifest:
        return manifest_mod.parse(self.storage.read_file(MANIFEST_FILE) or b"")[0]

    def history(self, manifest: Manifest) -> History:
        return load_history(
            self.storage, ObjectRef.catalog(manifest.history_hash, manifest.history_size)
        )


class PinnedRepository(ReadsHead):
    """A repository pinned by its master public key and name, read from storage."""

    def __init__(
        self, location: str, storage: ObjectSource, master_key: Ed25519PublicKey, name: str
    ):
        self.location = location
        self.storage = storage
        self.master_key = master_key
        self.name = name
        if storage.read_file(MANIFEST_FILE) is None:
            raise RepoError(f"{location}: not a repository (no manifest)")

    def trust(self) -> TrustedState:
        return read_trusted(self.storage, self.master_key, self.name, time.time())


def http_fetcher(
    location: str, deadline: float | None = None, ca_bundle: str | None = None
) -> CurlFetcher:
    """The client's fetcher for a repository's URL (mirrors of it separated by ';'):
    the same GET stack, size bounds, low-speed cut-off and retries as every reader."""
    from cvmfs_client.fetcher import CurlFetcher

    urls = [url for url in location.split(";") if url]
    for url in urls:
        network.check_location(url)
    if not urls or not all(is_url(url) for url in urls):
        raise RepoError(f"{location!r}: expected the repository's http:// or https:// URL")
    return CurlFetcher(
        urls, timeout_s=SOURCE_TIMEOUT_S, deadline=deadline, ca_bundle=network.ca_bundle(ca_bundle)
    )


def open_pinned(location: str, key_file: str, name: str | None = None) -> PinnedRepository:
    """The repository at a directory or http(s) URL (mirrors separated by ';'), pinned
    by the master public key in key_file and the name (default: the key file's)."""
    master_key = keys.load_public_key(Path(key_file))
    pinned = pinned_name(key_file, name)
    storage: ObjectSource
    if is_url(location):
        storage = FetchedObjects(http_fetcher(location))
    else:
        storage = LocalStorage(Path(location).resolve())
    return PinnedRepository(location, storage, master_key, pinned)
