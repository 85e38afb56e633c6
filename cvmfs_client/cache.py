"""The client's local cache: verified object contents, named by hash, under a quota.

An entry is written to a temporary file and renamed into place only after its hash was
verified, so a crash never leaves a half-written entry under its final name. The disk,
not memory, says what the cache holds: an entry removed behind the cache's back (`cache
clean` from another process, an admin's rm) is fetched again, and an entry is hashed
again before it is trusted whenever its inode, size, modification or change time
differ from when it was last verified (one fstat per open). An fd already handed out is
not checked again. Least recently used entries are evicted to stay under the quota;
entries open by a reader are pinned, and an object that cannot fit is served from an
unlinked temporary file. One process at a time owns a cache directory (lock_cache_dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cvmfs_client.errors import ClientError
from cvmfs_format.errors import VerificationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedFile:
    """Verified content a fetch worker wrote to a file in the cache's tmp/ directory
    (fetch_pool.py): the cache renames it into place instead of writing it."""

    path: str
    size: int


# Returns an object's content, already verified against its digest (decode_object
# hashes it), so the cache does not hash it a second time: in memory, or staged.
Fetch = Callable[[], "bytes | StagedFile"]

# What an entry looked like when it was last verified: st_ino, st_size, st_mtime_ns,
# st_ctime_ns. Writing to, truncating or replacing the file changes at least one.
Signature = tuple[int, int, int, int]

LOCK_FILE = "lock"
# No symlink followed, and a fifo put in an entry's place cannot block the open.
ENTRY_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class CacheInUse(ClientError):
    """Another mount (or preload) holds the cache directory."""


def lock_cache_dir(cache_dir: str) -> int:
    """Claim cache_dir for this process and the mount daemon it forks: an exclusive lock
    held while the returned fd (or a forked copy of it) is open. Two mounts sharing one
    cache would evict each other's entries and remove each other's temporary files."""
    os.makedirs(cache_dir, exist_ok=True)
    fd = os.open(os.path.join(cache_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheInUse(
            f"{cache_dir}: cache directory in use by a running mount; "
            "give each mount its own --cache-dir"
        ) from None
    return fd


def check_cache_dir(cache_dir: str) -> None:
    """Refuse, touching nothing, a directory that is not a client cache: `cache clean`
    must never delete what a mistyped --cache-dir names. A cache has the lock file a
    mount or preload took, and objects/ holds only tmp/ and two-hex-digit folders."""
    objects = os.path.join(cache_dir, "objects")
    try:
        names = os.listdir(objects)
        is_cache = os.path.isfile(os.path.join(cache_dir, LOCK_FILE)) and all(
            name == "tmp" or (len(name) == 2 and all(c in "0123456789abcdef" for c in name))
            for name in names
        )
    except OSError:
        is_cache = False
    if not is_cache:
        raise ClientError(
            f"{cache_dir}: not a cvmfs-client cache (left untouched); give the --cache-dir "
            "a mount or preload used"
        )


def wait_until_free(cache_dir: str, timeout: float) -> bool:
    """Wait until no process holds cache_dir's lock (a mount daemon exits shortly after
    its file system is unmounted); whether it is free."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(cache_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
    finally:
        os.close(fd)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    corrupt_entries: int = 0
    evictions: int = 0
    uncached: int = 0
    fetch_wait_s: float = 0.0  # readers (not prefetchers) waiting for a fetch, summed


@dataclass
class _FetchLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # threads holding or waiting for it


_worker = threading.local()


def background_thread() -> None:
    """Mark the calling thread as a prefetcher: its fetches are nobody's wait."""
    _worker.background = True


def write_temp(tmp_dir: str, content: bytes) -> str:
    """A new file in the cache's tmp/ holding content (the mount's or a fetch worker's)."""
    tmp = os.path.join(tmp_dir, secrets.token_hex(8))
    try:
        f = open(tmp, "xb")
    except FileNotFoundError:  # the whole cache was removed behind our back
        os.makedirs(tmp_dir, exist_ok=True)
        f = open(tmp, "xb")
    with f:
        f.write(content)
    return tmp


def is_background() -> bool:
    return bool(getattr(_worker, "background", False))


def _signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _fd_sha256(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, 1 << 20, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _is_entry_name(sub: str, name: str) -> bool:
    return len(sub) == 2 and len(name) == 62 and all(c in "0123456789abcdef" for c in sub + name)


class ObjectCache:
    """owner: this process holds the cache directory's lock (lock_cache_dir), so the
    temporary files found are left-overs of a killed client and can go; `cache clean`
    and `cache verify` beside a running mount are not owners."""

    def __init__(self, directory: str, quota: int | None = None, *, owner: bool = True):
        self.directory = directory
        self.quota = quota
        self.tmp = os.path.join(directory, "tmp")
        os.makedirs(self.tmp, exist_ok=True)
        if owner:
            for name in os.listdir(self.tmp):
                os.unlink(os.path.join(self.tmp, name))
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._verified: dict[str, Signature] = {}
        self._fetching: dict[str, _FetchLock] = {}
        self._pins: Counter[str] = Counter()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self._scan()

    def _scan(self) -> None:
        """Rebuild the LRU order from disk: oldest modification time first. Entries may
        vanish meanwhile (another process cleaning or evicting): they are skipped."""
        found = []
        for sub in os.listdir(self.directory):
            subdir = os.path.join(self.directory, sub)
            if len(sub) != 2 or not os.path.isdir(subdir):
                continue
            try:
                for entry in os.scandir(subdir):
                    if _is_entry_name(sub, entry.name):
                        with contextlib.suppress(FileNotFoundError):
                            st = entry.stat()
                            found.append((st.st_mtime_ns, sub + entry.name, st.st_size))
            except FileNotFoundError:
                continue
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

    def acquire(self, digest: str, fetch: Fetch, size: int | None = None) -> int:
        """An fd on the verified content of digest, pinned until release(). size, when
        given, is the content size the caller's catalog records for it."""
        fd, actual = self._ensure(digest, fetch)
        if size is not None and actual != size:
            self.release(digest, fd)
            raise VerificationError(f"object {digest}: {actual} bytes, but the catalog says {size}")
        return fd

    def release(self, digest: str, fd: int | None = None) -> None:
        if fd is not None:
            os.close(fd)
        with self._lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def pin_file(self, digest: str, fetch: Fetch) -> str:
        """A path to the verified content, pinned until release(digest): catalogs,
        which SQLite opens by path and keeps open while their revision is in use."""
        os.close(self._ensure(digest, fetch)[0])
        return self.path(digest)

    # -- internals ------------------------------------------------------------------

    @contextlib.contextmanager
    def _fetching_of(self, digest: str) -> Iterator[bool]:
        """Hold digest's fetch lock (one fetch or check of an object at a time); yields
        whether another thread held it first. The lock is forgotten when unused, so the
        locks held number the objects in flight, not every object ever fetched."""
        with self._lock:
            user = self._fetching.get(digest)
            if user is None:
                user = self._fetching[digest] = _FetchLock()
            user.users += 1
        waited = not user.lock.acquire(blocking=False)
        if waited:
            user.lock.acquire()
        try:
            yield waited
        finally:
            user.lock.release()
            with self._lock:
                user.users -= 1
                if user.users == 0:
                    del self._fetching[digest]

    def _ensure(self, digest: str, fetch: Fetch) -> tuple[int, int]:
        """(fd, size) of the verified entry, pinned; fetched when missing or bad. A
        reader's time spent fetching, or waiting for another thread fetching the same
        object, adds to stats.fetch_wait_s."""
        asked = time.monotonic()
        waiting_since = None
        try:
            with self._fetching_of(digest) as waited:
                if waited:
                    waiting_since = asked
                fd = self._open_fd(digest)
                if fd is not None:
                    size = self._trusted(digest, fd)
                    if size is not None:
                        with self._lock:
                            self._lru.move_to_end(digest)
                            self._pins[digest] += 1
                            self.stats.hits += 1
                        return fd, size
                    self._discard(digest, fd)
                waiting_since = waiting_since or time.monotonic()
                content = fetch()  # verified against digest by the fetch itself
                size = content.size if isinstance(content, StagedFile) else len(content)
                return self._store(digest, content), size
        finally:
            if waiting_since is not None and not is_background():
                with self._lock:
                    self.stats.fetch_wait_s += time.monotonic() - waiting_since

    def _open_fd(self, digest: str) -> int | None:
        try:
            return os.open(self.path(digest), ENTRY_OPEN_FLAGS)
        except OSError:  # removed behind our back, or a symlink put in its place
            with self._lock:
                self._forget(digest)
            return None

    def _trusted(self, digest: str, fd: int, touch: bool = True) -> int | None:
        """The size of digest's content if fd holds it (unchanged since it was verified,
        or hashed again now), else None. touch: mark it recently used."""
        st = os.fstat(fd)
        with self._lock:
            if self._verified.get(digest) == _signature(st):
                return st.st_size
        if not stat.S_ISREG(st.st_mode) or _fd_sha256(fd) != digest:
            return None
        if touch:
            os.utime(fd)  # keeps the LRU order across restarts
        with self._lock:
            self._verified[digest] = _signature(os.fstat(fd))
            self.used += st.st_size - self._lru.get(digest, 0)
            self._lru[digest] = st.st_size
        return st.st_size

    def _discard(self, digest: str, fd: int) -> None:
        """Close and remove a corrupt entry, unless a good copy already replaced it."""
        st = os.fstat(fd)
        os.close(fd)
        log.warning("cache entry %s is corrupt; fetching it again", digest)
        with self._lock:
            self.stats.corrupt_entries += 1
            self._forget(digest)
        path = self.path(digest)
        try:
            if os.lstat(path).st_ino == st.st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def _store(self, digest: str, content: bytes | StagedFile) -> int:
        """A pinned fd on content, kept as digest's entry if the quota allows."""
        size = content.size if isinstance(content, StagedFile) else len(content)
        with self._lock:
            self.stats.misses += 1
            self.stats.bytes_fetched += size
            fits = self._make_room(size)
            if fits:
                self._forget(digest)
                self._lru[digest] = size
                self.used += size
            else:
                self.stats.uncached += 1
            self._pins[digest] += 1
        fd = None
        tmp = None
        try:
            tmp = content.path if isinstance(content, StagedFile) else self._write_temp(content)
            fd = os.open(tmp, ENTRY_OPEN_FLAGS)
            if not fits:
                os.unlink(tmp)  # the fd keeps the content readable
                return fd
            self._install(tmp, self.path(digest))
            with self._lock:
                self._verified[digest] = _signature(os.fstat(fd))  # after the rename
            return fd
        except BaseException:
            self.release(digest, fd)
            with self._lock:
                self._forget(digest)
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise

    def _install(self, tmp: str, final: str) -> None:
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # its directory was removed behind our back
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(tmp, final)

    def _forget(self, digest: str) -> None:
        self.used -= self._lru.pop(digest, 0)
        self._verified.pop(digest, None)

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
        return write_temp(self.tmp, content)

    # -- maintenance ----------------------------------------------------------------

    def verify_all(self) -> list[str]:
        """Hash every entry again; remove and return the corrupt ones (`cache verify`)."""
        removed = []
        for digest in list(self._lru):
            with self._fetching_of(digest):
                with self._lock:
                    self._verified.pop(digest, None)
                fd = self._open_fd(digest)
                if fd is None:
                    continue
                # Not touched: a mount using this cache would then hash it again.
                if self._trusted(digest, fd, touch=False) is not None:
                    os.close(fd)
                else:
                    self._discard(digest, fd)
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
