"""A thin ctypes binding of libfuse3's low-level API (libfuse 3.14's fuse_lowlevel.h):
a session that calls a LowLevelFS with Python values and replies for it.

The only module that knows ctypes or libfuse's structures. fuse_file_info is never
read (its bitfields moved across 3.x): open and opendir are answered ENOSYS, so the
kernel sends no file or directory handles and READ/READDIR come by inode alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

ROOT_INODE = 1  # FUSE_ROOT_ID
CAP_AUTO_INVAL_DATA = 1 << 12
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
MAX_THREADS = 10


class Attr(NamedTuple):
    """What a `struct stat` of a read-only entry owned by root carries."""

    ino: int
    mode: int
    size: int
    nlink: int
    mtime_ns: int


class Reply(NamedTuple):
    """A lookup's answer: attr.ino 0 is a negative entry, cached for entry_timeout."""

    attr: Attr
    entry_timeout: float
    attr_timeout: float


# Adds one directory entry to a READDIR(PLUS) reply; False once the reply is full (that
# entry was not sent). readdir's add takes (name, attr, next offset); for plain READDIR
# only attr.ino and the type bits of attr.mode are sent.
AddEntry = Callable[[bytes, Reply, int], bool]


class LowLevelFS(Protocol):
    """The handlers a Session calls, on libfuse's worker threads. An OSError's errno is
    the reply; any other exception is logged and answered EIO."""

    def init(self) -> None: ...

    def lookup(self, parent: int, name: bytes) -> Reply: ...

    def forget(self, items: Sequence[tuple[int, int]]) -> None: ...

    def getattr(self, ino: int) -> tuple[Attr, float]: ...

    def readlink(self, ino: int) -> bytes: ...

    def read(self, ino: int, buffer: memoryview, offset: int) -> int: ...

    def readdir(self, ino: int, offset: int, add: AddEntry, plus: bool) -> None: ...

    def statfs(self, ino: int) -> tuple[int, int]:
        """(block size, longest name)"""
        ...

    def getxattr(self, ino: int, name: bytes) -> bytes: ...

    def listxattr(self, ino: int) -> list[bytes]: ...


# -- structures ------------------------------------------------------------------------


BLOCK_SIZE = 4096  # st_blksize; st_blocks counts 512-byte units


def _derived(a: Attr) -> tuple[int, int, int]:
    """(seconds, nanoseconds, 512-byte blocks): what a struct stat and a struct
    fuse_attr both derive from attr (atime, mtime and ctime are all mtime)."""
    seconds, nanoseconds = divmod(a.mtime_ns, 1_000_000_000)
    return seconds, nanoseconds, (a.size + 511) // 512


def _stat_struct() -> tuple[struct.Struct, Callable[[Attr], tuple[int, ...]]]:
    """`struct stat` of glibc on this machine, with a function giving its fields."""

    def fields(a: Attr) -> tuple[int, ...]:
        seconds, nanoseconds, blocks = _derived(a)
        times = (seconds, nanoseconds) * 3
        return (a.ino, a.nlink, a.mode, a.size, BLOCK_SIZE, blocks, *times)

    if platform.machine() == "x86_64":
        # dev ino nlink mode uid gid pad rdev size blksize blocks 3*timespec reserved[3]
        return struct.Struct("=8xQQI4x4x4x8xqqq" + "qq" * 3 + "24x"), fields

    # asm-generic (aarch64, riscv64): dev ino mode nlink uid gid rdev pad size blksize
    # pad blocks 3*timespec unused[2]
    def generic(a: Attr) -> tuple[int, ...]:
        ino, nlink, mode, size, blksize, blocks, *times = fields(a)
        return (ino, mode, nlink, size, blksize, blocks, *times)

    return struct.Struct("=8xQII4x4x8x8xqi4xq" + "qq" * 3 + "8x"), generic


_STAT, _stat_fields = _stat_struct()
STAT_SIZE = _STAT.size
# fuse_entry_param: ino, generation, struct stat, attr_timeout, entry_timeout
_ENTRY_HEAD = struct.Struct("=QQ")
_ENTRY_TAIL = struct.Struct("=dd")
ENTRY_SIZE = _ENTRY_HEAD.size + STAT_SIZE + _ENTRY_TAIL.size
# struct fuse_dirent of the kernel ABI: ino, off, namelen, type; the name follows, padded
# with zeros to 8 bytes
_DIRENT = struct.Struct("=QQII")
_PADDING = bytes(8)
# struct fuse_direntplus: fuse_entry_out (nodeid, generation, entry and attribute
# timeouts in seconds, their nanoseconds, then struct fuse_attr: ino size blocks atime
# mtime ctime, their nanoseconds, mode nlink uid gid rdev blksize flags), then the dirent
_DIRENTPLUS = struct.Struct("=QQQQII" + "QQQQQQ" + "IIIIIIIIII" + "QQII")
# struct statvfs: bsize frsize blocks bfree bavail files ffree favail fsid flag namemax
_STATVFS = struct.Struct("=11Q24x")


def _timeout(seconds: float) -> tuple[int, int]:
    """A timeout as the kernel takes it (whole seconds, nanoseconds), as libfuse's
    calc_timeout_sec and calc_timeout_nsec make it."""
    if seconds <= 0:
        return 0, 0
    whole = min(int(seconds), (1 << 64) - 1)
    return whole, min(int((seconds - whole) * 1e9), 999_999_999)


def _fuse_attr(a: Attr) -> tuple[int, ...]:
    """struct fuse_attr of attr, up to flags (order of _DIRENTPLUS): as convert_stat
    fills it from the struct stat a lookup reply carries."""
    seconds, nanoseconds, blocks = _derived(a)
    return (a.ino, a.size, blocks, seconds, seconds, seconds, nanoseconds, nanoseconds,
            nanoseconds, a.mode, a.nlink, 0, 0, 0, BLOCK_SIZE, 0)  # fmt: skip


def _pack_entry(buf: Any, reply: Reply) -> None:
    """struct fuse_entry_param of a lookup reply."""
    attr = reply.attr
    _ENTRY_HEAD.pack_into(buf, 0, attr.ino, 0)
    _STAT.pack_into(buf, _ENTRY_HEAD.size, *_stat_fields(attr))
    _ENTRY_TAIL.pack_into(
        buf, _ENTRY_HEAD.size + STAT_SIZE, reply.attr_timeout, reply.entry_timeout
    )


class _ConnInfo(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint)
        for name in (
            "proto_major", "proto_minor", "max_write", "max_read", "max_readahead",
            "capable", "want", "max_background", "congestion_threshold", "time_gran",
        )
    ] + [("reserved", ctypes.c_uint * 22)]  # fmt: skip


class _ForgetData(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("nlookup", ctypes.c_uint64)]


class _Args(ctypes.Structure):
    _fields_ = [
        ("argc", ctypes.c_int),
        ("argv", ctypes.POINTER(ctypes.c_char_p)),
        ("allocated", ctypes.c_int),
    ]


_req, _ino, _vp = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p
_size, _off, _name = ctypes.c_size_t, ctypes.c_int64, ctypes.c_char_p
_T = ctypes.CFUNCTYPE
_INIT = _T(None, _vp, ctypes.POINTER(_ConnInfo))
_DESTROY = _T(None, _vp)
_LOOKUP = _T(None, _req, _ino, _name)
_FORGET = _T(None, _req, _ino, ctypes.c_uint64)
_INO_FI = _T(None, _req, _ino, _vp)  # getattr, open, opendir
_INO = _T(None, _req, _ino)  # readlink, statfs
_READ = _T(None, _req, _ino, _size, _off, _vp)  # read, readdir, readdirplus
_GETXATTR = _T(None, _req, _ino, _name, _size)
_LISTXATTR = _T(None, _req, _ino, _size)
_FORGET_MULTI = _T(None, _req, _size, ctypes.POINTER(_ForgetData))

# struct fuse_lowlevel_ops, every member in 3.14's order; unset ones stay NULL.
_OPS_ORDER = (
    "init destroy lookup forget getattr setattr readlink mknod mkdir unlink rmdir symlink "
    "rename link open read write flush release fsync opendir readdir releasedir fsyncdir "
    "statfs setxattr getxattr listxattr removexattr access create getlk setlk bmap ioctl "
    "poll write_buf retrieve_reply forget_multi flock fallocate readdirplus "
    "copy_file_range lseek"
).split()


class _Ops(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _OPS_ORDER]


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("fuse3") or "libfuse3.so.3"
    lib = ctypes.CDLL(name, use_errno=True)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "fuse_session_new": (_vp, [ctypes.POINTER(_Args), ctypes.POINTER(_Ops), _size, _vp]),
        "fuse_session_mount": (ctypes.c_int, [_vp, ctypes.c_char_p]),
        "fuse_session_unmount": (None, [_vp]),
        "fuse_session_destroy": (None, [_vp]),
        "fuse_session_exit": (None, [_vp]),
        "fuse_set_signal_handlers": (ctypes.c_int, [_vp]),
        "fuse_remove_signal_handlers": (None, [_vp]),
        "fuse_loop_cfg_create": (_vp, []),
        "fuse_loop_cfg_destroy": (None, [_vp]),
        "fuse_loop_cfg_set_clone_fd": (None, [_vp, ctypes.c_uint]),
        "fuse_loop_cfg_set_max_threads": (None, [_vp, ctypes.c_uint]),
        "fuse_session_loop_mt_312": (ctypes.c_int, [_vp, _vp]),
        "fuse_reply_err": (ctypes.c_int, [_req, ctypes.c_int]),
        "fuse_reply_none": (None, [_req]),
        "fuse_reply_entry": (ctypes.c_int, [_req, ctypes.c_char_p]),
        "fuse_reply_attr": (ctypes.c_int, [_req, ctypes.c_char_p, ctypes.c_double]),
        "fuse_reply_buf": (ctypes.c_int, [_req, _vp, _size]),
        "fuse_reply_readlink": (ctypes.c_int, [_req, ctypes.c_char_p]),
        "fuse_reply_statfs": (ctypes.c_int, [_req, ctypes.c_char_p]),
        "fuse_reply_xattr": (ctypes.c_int, [_req, _size]),
        "fuse_add_direntry": (
            _size, [_req, _vp, _size, ctypes.c_char_p, ctypes.c_char_p, _off]
        ),
        "fuse_add_direntry_plus": (
            _size, [_req, _vp, _size, ctypes.c_char_p, ctypes.c_char_p, _off]
        ),
        "fuse_lowlevel_notify_inval_entry": (ctypes.c_int, [_vp, _ino, ctypes.c_char_p, _size]),
        "fuse_lowlevel_notify_inval_inode": (ctypes.c_int, [_vp, _ino, _off, _off]),
        "fuse_req_userdata": (_vp, [_req]),
    }  # fmt: skip
    for name, (restype, argtypes) in sigs.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """libfuse3, loaded once; OSError when it is not installed."""
    global _lib
    if _lib is None:
        _lib = _library()
    return _lib


_thread = threading.local()


def _keep_thread_state() -> None:
    """ctypes gives each call from a libfuse thread a fresh Python thread state and
    destroys it on return (an mmap, a munmap and a gettid per request). One
    PyGILState_Ensure never released keeps it for the life of the worker thread."""
    if not getattr(_thread, "kept", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _thread.kept = True


def _buffer(size: int) -> Any:
    """A reply buffer of at least size bytes, one per worker thread, reused."""
    buf = getattr(_thread, "buffer", None)
    if buf is None or len(buf) < size:
        buf = _thread.buffer = ctypes.create_string_buffer(max(size, 1 << 20))
    return buf


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Let the kernel read ahead kb KiB on the mount (FUSE's default is 128 KiB, so a
    file read whole arrives in 128 KiB READs whatever max_pages allows). Needs root;
    whether it was set."""
    device = os.stat(mountpoint).st_dev
    knob = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.info("cannot set %s: %s", knob, exc)
        return False
    return True


class Session:
    """One mounted low-level FUSE session serving fs. readdirplus: whether the kernel
    may ask for READDIRPLUS (answered with full entries, which count as lookups)."""

    def __init__(self, fs: LowLevelFS, mountpoint: str, options: list[str], readdirplus: bool):
        self.fs = fs
        self.mountpoint = mountpoint
        self.lib = library()
        self.readdirplus = readdirplus
        self._callbacks: list[Any] = []  # kept alive while libfuse holds the pointers
        # Requests by kind, and the seconds spent answering them (`cvmfs-client stat`).
        self.requests: Counter[str] = Counter()
        self.busy: dict[str, float] = {}
        self._stats_lock = threading.Lock()
        self._ops = self._make_ops()
        argv = [b"cvmfs-client", b"-o", ",".join(options).encode()]
        self._argv = (ctypes.c_char_p * len(argv))(*argv)
        args = _Args(len(argv), self._argv, 0)
        self.se = self.lib.fuse_session_new(
            ctypes.byref(args), ctypes.byref(self._ops), ctypes.sizeof(_Ops), None
        )
        if not self.se:
            raise OSError(errno.EINVAL, f"fuse_session_new refused options {options}")
        self._mounted = False

    # -- life cycle --------------------------------------------------------------------

    def mount(self) -> None:
        if self.lib.fuse_session_mount(self.se, os.fsencode(self.mountpoint)) != 0:
            raise OSError(errno.EIO, f"{self.mountpoint}: fuse_session_mount failed")
        self._mounted = True

    def loop(self, *, signals: bool = True) -> int:
        """Serve requests on MAX_THREADS threads, each with its own /dev/fuse clone,
        until unmounted (or, with signals, SIGINT/SIGTERM/SIGHUP)."""
        if signals:
            # libfuse takes only signals left at their default, and Python's SIGINT
            # handler would never run while this thread waits in C.
            previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
            self.lib.fuse_set_signal_handlers(self.se)
        config = self.lib.fuse_loop_cfg_create()
        self.lib.fuse_loop_cfg_set_clone_fd(config, 1)
        self.lib.fuse_loop_cfg_set_max_threads(config, MAX_THREADS)
        try:
            return int(self.lib.fuse_session_loop_mt_312(self.se, config))
        finally:
            self.lib.fuse_loop_cfg_destroy(config)
            if signals:
                self.lib.fuse_remove_signal_handlers(self.se)
                signal.signal(signal.SIGINT, previous)

    def close(self) -> None:
        if self._mounted:
            self.lib.fuse_session_unmount(self.se)
            self._mounted = False
        if self.se:
            self.lib.fuse_session_destroy(self.se)
            self.se = None

    def exit(self) -> None:
        self.lib.fuse_session_exit(self.se)

    # -- notifications (never from a request handler: the kernel may hold the locks
    # they need while it waits for that handler's reply) ------------------------------

    def inval_entry(self, parent: int, name: bytes) -> int:
        """Drop the kernel's dentry (positive or negative) of name in parent; 0 or
        -errno (-ENOENT: the kernel did not have it)."""
        return int(self.lib.fuse_lowlevel_notify_inval_entry(self.se, parent, name, len(name)))

    def inval_inode(self, ino: int) -> int:
        """Drop the kernel's attributes and cached pages (a directory's: its listing)."""
        return int(self.lib.fuse_lowlevel_notify_inval_inode(self.se, ino, 0, 0))

    # -- the ops table -----------------------------------------------------------------

    def _make_ops(self) -> _Ops:
        ops = _Ops()
        handlers: dict[str, tuple[Any, Callable[..., None]]] = {
            "init": (_INIT, self._init),
            "destroy": (_DESTROY, lambda userdata: None),
            "lookup": (_LOOKUP, self._lookup),
            "forget": (_FORGET, self._forget),
            "forget_multi": (_FORGET_MULTI, self._forget_multi),
            "getattr": (_INO_FI, self._getattr),
            "readlink": (_INO, self._readlink),
            "open": (_INO_FI, self._enosys),
            "opendir": (_INO_FI, self._enosys),
            "read": (_READ, self._read),
            "readdir": (_READ, self._readdir),
            "statfs": (_INO, self._statfs),
            "getxattr": (_GETXATTR, self._getxattr),
            "listxattr": (_LISTXATTR, self._listxattr),
        }
        if self.readdirplus:
            handlers["readdirplus"] = (_READ, self._readdirplus)
        for name, (prototype, function) in handlers.items():
            callback = prototype(self._counted(name, function))
            self._callbacks.append(callback)
            setattr(ops, name, ctypes.cast(callback, ctypes.c_void_p))
        return ops

    def statistics(self) -> dict[str, dict[str, Any]]:
        with self._stats_lock:
            busy = {kind: round(seconds, 3) for kind, seconds in self.busy.items()}
            return {"requests": dict(self.requests), "busy_s": busy}

    def _counted(self, kind: str, handler: Callable[..., None]) -> Callable[..., None]:
        if kind in ("init", "destroy"):
            return handler

        def counted(*args: Any) -> None:
            start = time.perf_counter()
            try:
                handler(*args)
            finally:
                with self._stats_lock:
                    self.requests[kind] += 1
                    self.busy[kind] = self.busy.get(kind, 0.0) + time.perf_counter() - start

        return counted

    def _fail(self, req: int, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno:
            self.lib.fuse_reply_err(req, exc.errno)
            return
        log.exception("FUSE handler failed", exc_info=exc)
        self.lib.fuse_reply_err(req, errno.EIO)

    def _init(self, userdata: int, conn: Any) -> None:
        _keep_thread_state()
        info = conn.contents
        # Content under an inode never changes: the kernel must not drop pages because
        # an mtime it sees differs (AUTO_INVAL_DATA); pages go by notify_inval_inode.
        want = info.want & ~CAP_AUTO_INVAL_DATA
        if self.readdirplus:
            want |= (CAP_READDIRPLUS | CAP_READDIRPLUS_AUTO) & info.capable
        info.want = want
        try:
            self.fs.init()
        except Exception:
            log.exception("init failed")

    def _enosys(self, req: int, ino: int, fi: int) -> None:
        self.lib.fuse_reply_err(req, errno.ENOSYS)

    def _lookup(self, req: int, parent: int, name: bytes) -> None:
        _keep_thread_state()
        try:
            reply = self.fs.lookup(parent, name)
        except BaseException as exc:
            self._fail(req, exc)
            return
        buf = ctypes.create_string_buffer(ENTRY_SIZE)
        _pack_entry(buf, reply)
        self.lib.fuse_reply_entry(req, buf)

    def _forget(self, req: int, ino: int, nlookup: int) -> None:
        _keep_thread_state()
        try:
            self.fs.forget([(ino, nlookup)])
        except Exception:
            log.exception("forget failed")
        self.lib.fuse_reply_none(req)

    def _forget_multi(self, req: int, count: int, forgets: Any) -> None:
        _keep_thread_state()
        try:
            self.fs.forget([(forgets[i].ino, forgets[i].nlookup) for i in range(count)])
        except Exception:
            log.exception("forget failed")
        self.lib.fuse_reply_none(req)

    def _getattr(self, req: int, ino: int, fi: int) -> None:
        _keep_thread_state()
        try:
            attr, timeout = self.fs.getattr(ino)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self.lib.fuse_reply_attr(req, _STAT.pack(*_stat_fields(attr)), timeout)

    def _readlink(self, req: int, ino: int) -> None:
        _keep_thread_state()
        try:
            target = self.fs.readlink(ino)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self.lib.fuse_reply_readlink(req, target)

    def _read(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        _keep_thread_state()
        buf = _buffer(size)
        try:
            done = self.fs.read(ino, memoryview(buf).cast("B")[:size], offset)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self.lib.fuse_reply_buf(req, ctypes.addressof(buf), done)

    def _list(self, req: int, ino: int, size: int, offset: int, plus: bool) -> None:
        _keep_thread_state()
        buf = _buffer(size)
        view = memoryview(buf).cast("B")
        used = 0
        address = ctypes.addressof(buf)

        def add(name: bytes, reply: Reply, next_offset: int) -> bool:
            nonlocal used
            # struct fuse_dirent(plus), as fuse_add_direntry(_plus) write them, packed
            # here: a sixth of the cost of a ctypes call and a struct stat per entry.
            head = _DIRENTPLUS if plus else _DIRENT
            end = used + head.size + len(name)
            need = (end - used + 7) & ~7
            if need > size - used:
                return False
            attr = reply.attr
            if plus:
                # . and .. go without a nodeid: nothing the kernel must count
                nodeid = 0 if name in (b".", b"..") else attr.ino
                entry_s, entry_ns = _timeout(reply.entry_timeout)
                attr_s, attr_ns = _timeout(reply.attr_timeout)
                _DIRENTPLUS.pack_into(
                    view, used, nodeid, 0, entry_s, attr_s, entry_ns, attr_ns,
                    *_fuse_attr(attr), attr.ino, next_offset, len(name), attr.mode >> 12,
                )  # fmt: skip
            else:
                _DIRENT.pack_into(view, used, attr.ino, next_offset, len(name), attr.mode >> 12)
            view[end - len(name) : end] = name
            view[end : used + need] = _PADDING[: used + need - end]
            used += need
            return True

        try:
            self.fs.readdir(ino, offset, add, plus)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self.lib.fuse_reply_buf(req, address, used)

    def _readdir(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        self._list(req, ino, size, offset, False)

    def _readdirplus(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        self._list(req, ino, size, offset, True)

    def _statfs(self, req: int, ino: int) -> None:
        _keep_thread_state()
        try:
            block, namemax = self.fs.statfs(ino)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self.lib.fuse_reply_statfs(
            req, _STATVFS.pack(block, block, 0, 0, 0, 0, 0, 0, 0, 0, namemax)
        )

    def _getxattr(self, req: int, ino: int, name: bytes, size: int) -> None:
        _keep_thread_state()
        try:
            value = self.fs.getxattr(ino, name)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self._reply_sized(req, value, size)

    def _listxattr(self, req: int, ino: int, size: int) -> None:
        _keep_thread_state()
        try:
            names = self.fs.listxattr(ino)
        except BaseException as exc:
            self._fail(req, exc)
            return
        self._reply_sized(req, b"".join(n + b"\0" for n in names), size)

    def _reply_sized(self, req: int, value: bytes, size: int) -> None:
        """size 0 asks for the length only; a value longer than size is ERANGE."""
        if size == 0:
            self.lib.fuse_reply_xattr(req, len(value))
        elif len(value) > size:
            self.lib.fuse_reply_err(req, errno.ERANGE)
        else:
            self.lib.fuse_reply_buf(req, value, len(value))
