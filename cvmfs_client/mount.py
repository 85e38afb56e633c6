"""`cvmfs-client mount`/`umount`: wiring a verified reader, a cache and FUSE together.

The mount verifies the manifest before it detaches, so a bad URL or key is reported
on the terminal; it returns only once the kernel has the file system mounted.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from cvmfs_client.bundles import BundleFetcher
from cvmfs_client.cache import ObjectCache, lock_cache_dir, wait_until_free
from cvmfs_client.daemon_log import LogSettings, destination, start_logging
from cvmfs_client.errors import ClientError
from cvmfs_client.fetch_pool import WORKERS as FETCH_WORKERS
from cvmfs_client.fetch_pool import FetchPool, PoolUnavailable
from cvmfs_client.fetcher import OfflineFallback, fetcher_for
from cvmfs_client.fuse_ll_ops import DAY, RepositoryOps
from cvmfs_client.fuse_lowlevel import Session, set_read_ahead
from cvmfs_client.fuse_revisions import Kernel, RevisionFollower
from cvmfs_client.repository import RepositoryReader
from cvmfs_client.trace import Tracer
from cvmfs_client.trust_store import default_state_dir, open_trust
from cvmfs_format.manifest import MANIFEST_FILE
from cvmfs_format.signed import key_fingerprint
from cvmfs_format.whitelist import WHITELIST_FILE

READ_AHEAD_KB = 1024  # the largest READ libfuse3 negotiates (max_pages 256)
UMOUNT_WAIT_S = 10  # for the daemon to exit and free its cache directory
OPEN_FILES = 131072  # as CernVM-FS's CVMFS_NFILES: one per open catalog, cache entry, connection


@dataclass(frozen=True)
class MountOptions:
    url: str
    mountpoint: str
    key_file: str
    cache_dir: str
    foreground: bool = False
    quota: int | None = None
    proxies: str = ""
    max_ttl: float | None = None
    tag: str | None = None
    revision: int | None = None
    prefetch: bool = True  # prefetch bundles, and a directory's small files when one is opened
    fetch_workers: int = FETCH_WORKERS  # processes that fetch objects (0: the daemon itself)
    trace: str | None = None  # append the first access of each file and chunk to this file
    name: str | None = None  # the repository's name (default: the key file's NAME.pub)
    state_dir: str | None = None  # where revision floors are kept (default_state_dir())
    kcache_timeout: float | None = None  # the kernel's entry and attribute cache (seconds)
    log: LogSettings = LogSettings()  # where the mount's messages go (daemon_log)
    ca_bundle: str | None = None  # CA certificates for https (default: the system's)


def default_cache_dir(name: str, base: str | None = None) -> str:
    """One cache per repository under the cache base (CVMFS_CACHE_BASE), as CernVM-FS
    lays it out: mounts of two repositories never share, so never evict each other's
    entries."""
    if base is None:
        base = "/var/lib/cvmfs-client/cache" if os.geteuid() == 0 else "~/.cache/cvmfs-client"
    return os.path.join(os.path.expanduser(base), name)


def open_reader(options: MountOptions) -> RepositoryReader:
    """A reader of the repository the options name, its manifest verified and its floor
    remembered (in the state directory, shared with cat, ls and preload)."""
    trust, floors = open_trust(
        options.key_file, options.name, options.state_dir or default_state_dir(),
        legacy_dir=options.cache_dir,
    )  # fmt: skip
    # Held by the mount daemon (forked with it) for as long as it runs.
    lock_cache_dir(options.cache_dir)
    cache = ObjectCache(os.path.join(options.cache_dir, "objects"), options.quota)
    fetcher = OfflineFallback(
        fetcher_for(options.url, options.proxies, options.ca_bundle),
        options.cache_dir,
        frozenset({MANIFEST_FILE, WHITELIST_FILE}),
        prefix=f"{trust.name}-{key_fingerprint(trust.master_key)[:16]}",
    )
    reader = RepositoryReader(fetcher, trust, cache=cache, max_ttl=options.max_ttl)
    reader.load_manifest()
    floors.store(trust.floor)
    reader.on_new_revision = lambda m: floors.store(trust.floor)
    if options.tag is not None or options.revision is not None:
        reader.select_revision(revision=options.revision, tag=options.tag)
    reader.root_catalog()
    return reader


def _both(*hooks: Callable[..., None]) -> Callable[..., None] | None:
    """One callable calling each hook in turn (None for none)."""
    if len(hooks) < 2:
        return hooks[0] if hooks else None

    def call(*args: Any) -> None:
        for hook in hooks:
            hook(*args)

    return call


def _open_trace(path: str | None) -> TextIO | None:
    if path is None:
        return None
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise ClientError(f"--trace {path}: {exc.strerror}; give a writable file") from None


def mount(options: MountOptions) -> int:
    if not os.path.isdir(options.mountpoint):
        raise ClientError(f"{options.mountpoint}: mount point is not a directory")
    if os.path.ismount(options.mountpoint):
        raise ClientError(f"{options.mountpoint}: something is already mounted there")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise ClientError("mounting as a user needs fusermount3: apt-get install fuse3")
    trace_out = _open_trace(options.trace)
    reader = open_reader(options)
    log_file = os.path.join(options.cache_dir, "client.log")
    if options.foreground:
        _start_logging(options, reader, log_file)
        # From a thread of its own: stat'ing the mount point waits for init to return.
        serve(
            reader, options,
            lambda: threading.Thread(target=_read_ahead, args=(options,)).start(),
            trace_out,
        )  # fmt: skip
        return 0
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        status = 1

        def mounted() -> None:
            # Leave the caller's session only now: mounted by autofs, a process outside
            # automount's process group that looks at the mount point waits for the
            # very mount it is making.
            os.setsid()
            os.write(write_end, b"1")

        try:
            _start_logging(options, reader, log_file)
            serve(reader, options, mounted, trace_out)
            status = 0
        except BaseException:  # the parent reports failure; the details go to the log
            logging.exception("mount failed")
        finally:
            os._exit(status)
    os.close(write_end)
    if trace_out is not None:
        trace_out.close()  # the daemon holds its own copy
    ready = os.read(read_end, 1)
    os.close(read_end)
    if ready != b"1":
        os.waitpid(pid, 0)
        where = destination(options.log, log_file)
        raise ClientError(f"mounting {options.mountpoint} failed; see {where}")
    _read_ahead(options)
    return 0


def serve(
    reader: RepositoryReader,
    options: MountOptions,
    on_ready: Callable[[], object],
    trace_out: TextIO | None = None,
) -> None:
    """Serve until unmounted: libfuse3's low-level API, names, attributes, listings and
    pages cached by the kernel (fuse_ll_ops.py), a thread that follows new revisions
    and invalidates what they change (fuse_revisions.py), and the access tracer and
    bundle fetcher the options ask for (started here: threads do not survive a fork)."""
    assert reader.manifest is not None
    _raise_open_files()
    ttl = reader.manifest.ttl if options.max_ttl is None else options.max_ttl
    fuse_options = ["ro", f"fsname=cvmfs-py:{reader.manifest.name}", "default_permissions"]
    if os.geteuid() == 0:
        fuse_options.append("allow_other")
    timeout = DAY if options.kcache_timeout is None else options.kcache_timeout
    tracer = Tracer(reader, trace_out) if trace_out is not None else None
    if reader.cache is not None and options.fetch_workers > 0:
        objects = getattr(reader.fetcher, "inner", reader.fetcher)  # objects are not offline
        try:
            reader.pool = FetchPool(objects, reader.cache.tmp, options.fetch_workers)
        except PoolUnavailable as exc:
            logging.warning("%s; fetching in the mount's own process", exc)
    bundles = BundleFetcher(reader) if options.prefetch and reader.cache is not None else None
    hooks = [h for h in (tracer, bundles) if h is not None]
    ops = RepositoryOps(
        reader, on_ready, prefetch_siblings=options.prefetch, timeout=timeout,
        on_lookup=_both(*(h.on_lookup for h in hooks)),
        on_read=_both(*(h.on_read for h in hooks)),
        more_statistics=bundles.statistics if bundles else None,
        bundled=bundles.covers if bundles else None,
    )  # fmt: skip
    session = Session(ops, options.mountpoint, fuse_options, readdirplus=True)
    ops.statistics_sources.append(session.statistics)
    follower = RevisionFollower(ops, Kernel(session.inval_entry, session.inval_inode), ttl)
    try:
        session.mount()
        follower.start()
        session.loop()
    finally:
        follower.stop()
        ops.close()
        session.close()
        if reader.pool is not None:
            reader.pool.close()
        if tracer is not None:
            try:
                tracer.close()
            except OSError:
                logging.exception("writing the trace failed")


def _raise_open_files() -> None:
    """Each catalog of a revision in use holds an open file, and a walk of a large
    repository opens thousands: take what the hard limit allows, up to CernVM-FS's
    default (CVMFS_NFILES), not the 1,024 a service gets by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _read_ahead(options: MountOptions) -> None:
    if os.geteuid() == 0:
        set_read_ahead(options.mountpoint, READ_AHEAD_KB)


def _start_logging(options: MountOptions, reader: RepositoryReader, log_file: str) -> None:
    """The one place a mount's logging is set up, in the foreground or the daemon."""
    assert reader.manifest is not None
    start_logging(
        options.log, repository=reader.manifest.name, foreground=options.foreground,
        fallback_file=log_file,
    )  # fmt: skip
    logging.getLogger(__name__).info(
        "mounting revision %d at %s from %s",
        reader.manifest.revision, options.mountpoint, reader.fetcher.describe(),
    )  # fmt: skip


def umount(mountpoint: str) -> int:
    if not os.path.ismount(mountpoint):
        raise ClientError(f"{mountpoint}: not mounted")
    try:
        objects = json.loads(os.getxattr(mountpoint, "user.stats"))["cache_dir"]
    except (OSError, ValueError, KeyError):
        objects = None  # not ours, or not answering: nothing to wait for
    fusermount = shutil.which("fusermount3") or "fusermount"
    command = [fusermount, "-u", mountpoint] if os.geteuid() != 0 else ["umount", mountpoint]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClientError(f"unmounting {mountpoint} failed: {result.stderr.strip()}")
    if objects is not None:  # so that `umount && mount` on the same cache just works
        wait_until_free(os.path.dirname(objects), UMOUNT_WAIT_S)
    return 0
