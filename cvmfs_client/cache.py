"""The client's local cache: verified object contents, named by hash, on local disk.

An entry is written to a temporary file and renamed into place only after its hash
was verified, so a crash never leaves a half-written entry under its final name; an
entry found on disk is hashed again once per process before it is trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cvmfs_client.errors import ClientError

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    corrupt_entries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ObjectCache:
    def __init__(self, directory: str):
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        os.makedirs(self.tmp, exist_ok=True)
        for name in os.listdir(self.tmp):  # left by a killed client
            os.unlink(os.path.join(self.tmp, name))
        self.stats = CacheStats()
        self._verified: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest[:2], digest[2:])

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(digest, threading.Lock())

    def get(self, digest: str, fetch: Callable[[], bytes]) -> str:
        """Path of the verified cache file holding digest's content, fetching if needed.

        `fetch` must return content already verified against digest.
        """
        final = self.path(digest)
        with self._lock_for(digest):
            if digest in self._verified and os.path.exists(final):
                with self.stats.lock:
                    self.stats.hits += 1
                return final
            if os.path.exists(final):
                if _file_sha256(final) == digest:
                    self._verified.add(digest)
                    with self.stats.lock:
                        self.stats.hits += 1
                    return final
                log.warning("cache entry %s is corrupt; fetching it again", digest)
                with self.stats.lock:
                    self.stats.corrupt_entries += 1
                os.unlink(final)
            content = fetch()
            if hashlib.sha256(content).hexdigest() != digest:
                raise ClientError(f"object {digest}: fetched content does not match its hash")
            self._store(final, content)
            self._verified.add(digest)
            with self.stats.lock:
                self.stats.misses += 1
                self.stats.bytes_fetched += len(content)
            return final

    def _store(self, final: str, content: bytes) -> None:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(self.tmp, secrets.token_hex(8))
        with open(tmp, "wb") as f:
            f.write(content)
        os.rename(tmp, final)

    def verify_all(self) -> list[str]:
        """Hash every entry; remove and return the corrupt ones (`cache verify`)."""
        removed = []
        for sub in sorted(os.listdir(self.directory)):
            subdir = os.path.join(self.directory, sub)
            if len(sub) != 2 or not os.path.isdir(subdir):
                continue
            for name in os.listdir(subdir):
                path = os.path.join(subdir, name)
                if _file_sha256(path) != sub + name:
                    os.unlink(path)
                    removed.append(sub + name)
        return removed
