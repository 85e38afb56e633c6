"""The client's local cache: verified object contents, named by hash, under a quota.

An entry is written to a temporary file and renamed into place only after its hash was
verified, so a crash never leaves a half-written entry under its final name; an entry
found on disk is hashed again once per process before it is trusted. Least recently
used entries are evicted to stay under the quota; entries open by a reader are pinned,
and an object that cannot fit is served from an unlinked temporary file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Returns an object's content, already verified against its digest (decode_object
# hashes it), so the cache does not hash it a second time.
Fetch = Callable[[], bytes]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    corrupt_entries: int = 0
    evictions: int = 0
    uncached: int = 0


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _is_entry_name(sub: str, name: str) -> bool:
    return len(sub) == 2 and len(name) == 62 and all(c in "0123456789abcdef" for c in sub + name)


class ObjectCache:
    def __init__(self, directory: str, quota: int | None = None):
        self.directory = directory
        self.quota = quota
        self.tmp = os.path.join(directory, "tmp")
        os.makedirs(self.tmp, exist_ok=True)
        for name in os.listdir(self.tmp):  # left by a killed client
            os.unlink(os.path.join(self.tmp, name))
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._verified: set[str] = set()
        self._fetching: dict[str, threading.Lock] = {}
        self._pins: Counter[str] = Counter()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self._scan()

    def _scan(self) -> None:
        """Rebuild the LRU order from disk: oldest modification time first."""
        found = []
        for sub in os.listdir(self.directory):
            subdir = os.path.join(self.directory, sub)
            if len(sub) != 2 or not os.path.isdir(subdir):
                continue
            for entry in os.scandir(subdir):
                if _is_entry_name(sub, entry.name):
                    st = entry.stat()
                    found.append((st.st_mtime_ns, sub + entry.name, st.st_size))
        for _, digest, size in sorted(found):
            self._lru[digest] = size
            self.used += size

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, digest: object) -> bool:
        """Whether an entry for digest is on disk (verified or not yet)."""
        return digest in self._lru

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest[:2], digest[2:])

    # -- the two ways in ------------------------------------------------------------

    def acquire(self, digest: str, fetch: Fetch) -> int:
        """An fd on the verified content of digest, pinned until release()."""
        path, ephemeral = self._ensure(digest, fetch, pin=True)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            self.release(digest)
            raise
        if ephemeral:
            os.unlink(path)  # the fd keeps the content readable
        return fd

    def release(self, digest: str, fd: int | None = None) -> None:
        if fd is not None:
            os.close(fd)
        with self._lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def get_pinned(self, digest: str, fetch: Fetch) -> str:
        """A path to the verified content that stays pinned for the cache's lifetime
        (catalogs, which SQLite keeps open)."""
        path, ephemeral = self._ensure(digest, fetch, pin=True)
        return path

    # -- internals ------------------------------------------------------------------

    def _fetch_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._fetching.setdefault(digest, threading.Lock())

    def _ensure(self, digest: str, fetch: Fetch, pin: bool) -> tuple[str, bool]:
        final = self.path(digest)
        with self._fetch_lock(digest):
            with self._lock:
                if digest in self._lru and digest in self._verified:
                    self._lru.move_to_end(digest)
                    self._pins[digest] += pin
                    self.stats.hits += 1
                    return final, False
            if digest in self._lru and os.path.exists(final):
                if _file_sha256(final) == digest:
                    with self._lock:
                        self._verified.add(digest)
                        self._lru.move_to_end(digest)
                        self._pins[digest] += pin
                        self.stats.hits += 1
                    os.utime(final)  # keeps the LRU order across restarts
                    return final, False
                log.warning("cache entry %s is corrupt; fetching it again", digest)
                with self._lock:
                    self.stats.corrupt_entries += 1
                    self._forget(digest)
                os.unlink(final)
            elif digest in self._lru:
                with self._lock:
                    self._forget(digest)
            content = fetch()  # verified against digest by the fetch itself
            with self._lock:
                self.stats.misses += 1
                self.stats.bytes_fetched += len(content)
                fits = self._make_room(len(content))
                if fits:
                    self._lru[digest] = len(content)
                    self.used += len(content)
                    self._verified.add(digest)
                    self._pins[digest] += pin
                else:
                    self.stats.uncached += 1
            if not fits:
                return self._write_temp(content), True
            tmp = self._write_temp(content)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(tmp, final)
            return final, False

    def _forget(self, digest: str) -> None:
        self.used -= self._lru.pop(digest, 0)
        self._verified.discard(digest)

    def _make_room(self, size: int) -> bool:
        """Evict unpinned entries, oldest first, until size fits (call with _lock)."""
        if self.quota is None:
            return True
        if size > self.quota:
            return False
        for digest in list(self._lru):
            if self.used + size <= self.quota:
                break
            if self._pins.get(digest):
                continue
            try:
                os.unlink(self.path(digest))
            except FileNotFoundError:
                pass
            self._forget(digest)
            self.stats.evictions += 1
        return self.used + size <= self.quota

    def _write_temp(self, content: bytes) -> str:
        tmp = os.path.join(self.tmp, secrets.token_hex(8))
        with open(tmp, "wb") as f:
            f.write(content)
        return tmp

    # -- maintenance ----------------------------------------------------------------

    def verify_all(self) -> list[str]:
        """Hash every entry; remove and return the corrupt ones (`cache verify`)."""
        removed = []
        for digest in list(self._lru):
            path = self.path(digest)
            if not os.path.exists(path) or _file_sha256(path) != digest:
                with self._lock:
                    self._forget(digest)
                if os.path.exists(path):
                    os.unlink(path)
                removed.append(digest)
        return removed

    def clean(self) -> int:
        """Remove every unpinned entry; returns the bytes freed (`cache clean`)."""
        freed = 0
        with self._lock:
            for digest in list(self._lru):
                if self._pins.get(digest):
                    continue
                freed += self._lru[digest]
                try:
                    os.unlink(self.path(digest))
                except FileNotFoundError:
                    pass
                self._forget(digest)
        return freed
