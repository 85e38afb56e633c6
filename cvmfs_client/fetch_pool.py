"""Object fetches in worker processes: download, decompress, verify and write to the
cache's tmp/ there, so the mount's FUSE threads never wait for the GIL behind them.

FetchPool.fetch(digest, size) hands one object to an idle worker and blocks (without
the GIL) until the worker has written its verified content to a file in the cache's
tmp/ directory; the cache renames that file into place (cache.StagedFile). A worker
that dies is started again; while none can be started, the caller is told and fetches
in its own process. Workers exit when the mount's end of their pipe closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn

from cvmfs_client.cache import LOCK_FILE, StagedFile, is_background, write_temp
from cvmfs_client.errors import FetchError
from cvmfs_format.errors import CvmfsError, NotFoundError, VerificationError
from cvmfs_format.objects import ObjectRef

if TYPE_CHECKING:
    from cvmfs_client.fetcher import Fetcher

log = logging.getLogger(__name__)

WORKERS = 4  # processes; one of them is kept for readers while prefetchers use the rest
# Errors a worker reports by name; any other becomes a FetchError with its message.
_ERRORS: dict[str, type[CvmfsError]] = {
    "NotFoundError": NotFoundError,
    "VerificationError": VerificationError,
}


class PoolUnavailable(FetchError):
    """No worker process could be started: fetch in this process instead."""


@dataclass
class _Worker:
    pid: int
    conn: _Duplex
    status: int | None = None  # as os.waitstatus_to_exitcode gives it, once reaped

    def reap(self, timeout: float = 0) -> int | None:
        """The exit status, waiting up to timeout seconds; None while it runs."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                break
            else:
                time.sleep(0.02)
        return self.status


class FetchPool:
    """fetcher: what the workers fetch objects with (pickled to them: settings, not
    connections); tmp_dir: where they write, on the cache's file system."""

    def __init__(self, fetcher: Fetcher, tmp_dir: str, workers: int = WORKERS):
        self.fetcher = fetcher
        self.tmp_dir = tmp_dir
        self._settings = pickle.dumps((fetcher, tmp_dir))
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        # Prefetchers may hold all workers but one: a reader's miss never waits
        # behind a whole queue of speculative fetches.
        self._background = threading.BoundedSemaphore(max(workers - 1, 1))
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._closed = False
        self.restarts = 0
        # Forked while this is the process's only thread: a worker that shares the
        # mount's loaded code is ready at once (a fresh interpreter takes 0.1 s of CPU
        # and a few tenths of a second to start, just when a cold job starts reading).
        fork = threading.active_count() == 1
        for _ in range(workers):
            self._idle.put(self._start(fork))

    def _start(self, fork: bool = False) -> _Worker:
        """A new worker: forked, or (once other threads run, when forking could copy
        a lock another thread holds) a fresh interpreter."""
        to_worker, from_worker = os.pipe(), os.pipe()
        try:
            if fork:
                pid = os.fork()
                if pid == 0:
                    # Only its own ends: a copy of another's (or of the mount's end of
                    # its own) would keep that pipe from ever reaching end of file.
                    os.close(to_worker[1])
                    os.close(from_worker[0])
                    for other in self._all:
                        other.conn.close()
                    _forked_worker(to_worker[0], from_worker[1], self.fetcher, self.tmp_dir)
            else:
                pid = os.posix_spawn(
                    sys.executable,
                    [sys.executable, "-c", "from cvmfs_client.fetch_pool import main; main()"],
                    os.environ,
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, to_worker[0], _WORKER_IN),
                        (os.POSIX_SPAWN_DUP2, from_worker[1], _WORKER_OUT),
                    ],
                )
        except OSError as exc:
            for fd in (*to_worker, *from_worker):
                os.close(fd)
            raise PoolUnavailable(f"cannot start a fetch worker: {exc}") from exc
        os.close(to_worker[0])
        os.close(from_worker[1])
        conn = _Duplex(from_worker[0], to_worker[1])
        if not fork:
            conn.send_bytes(self._settings)
        worker = _Worker(pid, conn)
        with self._lock:
            self._all.append(worker)
        return worker

    def fetch(self, digest: str, size: int) -> StagedFile:
        """The verified content of object digest (content size `size`) in a new file
        under tmp_dir, which the caller owns. Errors as the in-process fetch raises."""
        background = is_background()
        if background:
            self._background.acquire()
        try:
            reply = self._request(digest, size)
        finally:
            if background:
                self._background.release()
        status, *rest = reply
        *result, downloaded, failures, route = rest
        counted = getattr(self.fetcher, "count", None)  # for `cvmfs-client stat`
        if counted is not None:
            counted(downloaded, failures, route)
        if status == "ok":
            name, length = result
            return StagedFile(os.path.join(self.tmp_dir, name), length)
        kind, message = result
        raise _ERRORS.get(kind, FetchError)(message)

    def _request(self, digest: str, size: int) -> tuple[Any, ...]:
        """A worker's reply. A worker that dies (the OOM killer, an admin's kill) is
        replaced and the request given to another, once; PoolUnavailable once no
        worker is left and none can be started."""
        died = 0
        while True:
            worker = self._take()
            try:
                reply = self._ask(worker, (digest, size))
            except (EOFError, OSError) as exc:
                self._replace(worker)
                died += 1
                with self._lock:
                    left = bool(self._all)
                if died == 2 and left:
                    raise FetchError(f"object {digest}: fetch worker died ({exc})") from None
                continue  # to another worker, or PoolUnavailable if none is left
            self._idle.put(worker)
            return reply

    def _take(self) -> _Worker:
        while True:
            with self._lock:
                if not self._all:
                    raise PoolUnavailable("no fetch worker is running")
            try:
                return self._idle.get(timeout=1)
            except queue.Empty:
                continue

    def _ask(self, worker: _Worker, request: tuple[str, int]) -> tuple[Any, ...]:
        worker.conn.send_bytes(pickle.dumps(request))
        reply: tuple[Any, ...] = pickle.loads(worker.conn.recv_bytes())
        return reply

    def _replace(self, worker: _Worker) -> None:
        worker.conn.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        status = worker.reap(timeout=5)
        with self._lock:
            self._all.remove(worker)
            self.restarts += 1
            if self._closed:
                return
        log.warning("a fetch worker exited (status %s); starting another", status)
        try:
            self._idle.put(self._start())
        except PoolUnavailable as exc:
            log.error("%s", exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
        for worker in workers:
            worker.conn.close()  # the worker sees the end of its input and exits
        for worker in workers:
            if worker.reap(timeout=5) is None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.reap(timeout=5)


class _Duplex:
    """A Connection that reads one pipe and writes another."""

    def __init__(self, read_fd: int, write_fd: int):
        self._in = Connection(read_fd, writable=False)
        self._out = Connection(write_fd, readable=False)

    def send_bytes(self, data: bytes) -> None:
        self._out.send_bytes(data)

    def recv_bytes(self) -> bytes:
        return self._in.recv_bytes()

    def close(self) -> None:
        self._out.close()
        self._in.close()


# -- the worker process ----------------------------------------------------------------


_WORKER_IN, _WORKER_OUT = 3, 4  # a spawned worker's pipe ends


def _forked_worker(read_fd: int, write_fd: int, fetcher: Fetcher, tmp_dir: str) -> NoReturn:
    """A forked worker: it keeps the mount's logging, and closes its copy of the cache
    directory's lock, which must go when the mount's daemon goes."""
    status = 1
    # tmp_dir is CACHE_DIR/objects/tmp; lock_cache_dir locked CACHE_DIR/lock
    lock = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tmp_dir))), LOCK_FILE)
    try:
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") == lock:
                    os.close(int(name))
        _serve(_Duplex(read_fd, write_fd), fetcher, tmp_dir)
        status = 0
    finally:
        os._exit(status)


def main() -> None:
    """A worker: read (digest, size) requests, answer ("ok", tmp name, content size)
    or ("error", kind, message), each followed by the bytes downloaded and the failed
    requests it took, and the route that served it. Interrupts are the mount's to
    handle: the worker exits when the mount closes its pipe."""
    conn = _Duplex(_WORKER_IN, _WORKER_OUT)
    fetcher, tmp_dir = pickle.loads(conn.recv_bytes())
    _serve(conn, fetcher, tmp_dir)


def _serve(conn: _Duplex, fetcher: Fetcher, tmp_dir: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            digest, size = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        before = getattr(fetcher, "bytes_downloaded", 0), getattr(fetcher, "failures", 0)
        try:
            ref = ObjectRef(digest, size)
            content = fetcher.fetch(ref.path, ref.max_stored, ref.decode)
            name = os.path.basename(write_temp(tmp_dir, content))
            reply: tuple[Any, ...] = ("ok", name, len(content))
        except CvmfsError as exc:
            reply = ("error", type(exc).__name__, str(exc))
        except OSError as exc:  # the cache's disk is full, or its tmp/ was removed
            reply = ("error", "FetchError", f"object {digest}: cannot write to the cache: {exc}")
        downloaded = getattr(fetcher, "bytes_downloaded", 0) - before[0]
        failures = getattr(fetcher, "failures", 0) - before[1]
        route = getattr(fetcher, "preferred", None) if reply[0] == "ok" else None
        conn.send_bytes(pickle.dumps((*reply, downloaded, failures, route)))
