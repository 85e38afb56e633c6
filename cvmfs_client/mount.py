"""`cvmfs-client mount`/`umount`: wiring a verified reader, a cache and FUSE together.

The mount verifies the manifest before it detaches, so a bad URL or key is reported
on the terminal; it returns only once the kernel has the file system mounted.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from cvmfs_client.bundles import BundleFetcher
from cvmfs_client.cache import ObjectCache, lock_cache_dir, wait_until_free
from cvmfs_client.errors import ClientError
from cvmfs_client.fetcher import OfflineFallback, fetcher_for
from cvmfs_client.fuse_bridge import Bridge
from cvmfs_client.fuse_ops import RepositoryFS
from cvmfs_client.repository import RepositoryReader
from cvmfs_client.trace import Tracer
from cvmfs_client.trust_store import default_state_dir, open_trust
from cvmfs_format.manifest import MANIFEST_FILE
from cvmfs_format.signed import key_fingerprint
from cvmfs_format.whitelist import WHITELIST_FILE

ENTRY_TIMEOUT_S = 60  # content is immutable per revision: let the kernel cache it
UMOUNT_WAIT_S = 10  # for the daemon to exit and free its cache directory


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
    trace: str | None = None  # append the first access of each file and chunk to this file
    name: str | None = None  # the repository's name (default: the key file's NAME.pub)
    state_dir: str | None = None  # where revision floors are kept (default_state_dir())


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
        fetcher_for(options.url, options.proxies),
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


def _filesystem(
    reader: RepositoryReader,
    options: MountOptions,
    trace_out: TextIO | None,
    **kwargs: Any,
) -> tuple[RepositoryFS, Tracer | None]:
    """The FUSE operations with the tracer and the bundle fetcher the options ask for
    (started here: in the daemon, since threads do not survive its fork)."""
    tracer = Tracer(reader, trace_out) if trace_out is not None else None
    bundles = BundleFetcher(reader) if options.prefetch and reader.cache is not None else None
    hooks = [h for h in (tracer, bundles) if h is not None]
    fs = RepositoryFS(
        reader,
        prefetch_siblings=options.prefetch,
        on_lookup=_both(*(h.on_lookup for h in hooks)),
        on_read=_both(*(h.on_read for h in hooks)),
        more_statistics=bundles.statistics if bundles else None,
        bundled=bundles.covers if bundles else None,
        **kwargs,
    )
    return fs, tracer


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
    trace_out = _open_trace(options.trace)
    reader = open_reader(options)
    assert reader.manifest is not None
    ttl = reader.manifest.ttl if options.max_ttl is None else options.max_ttl
    timeout = min(ENTRY_TIMEOUT_S, ttl)
    fuse_options = {
        "ro": True,
        "fsname": f"cvmfs-py:{reader.manifest.name}",
        # No auto_cache: RepositoryFS.open tells the kernel when to keep a file's pages.
        "entry_timeout": timeout,
        "attr_timeout": timeout,
        "negative_timeout": timeout,
        "default_permissions": True,
    }
    if os.geteuid() == 0:
        fuse_options["allow_other"] = True
    log_file = os.path.join(options.cache_dir, "client.log")
    if options.foreground:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
        fs, tracer = _filesystem(reader, options, trace_out, attr_timeout=timeout)
        try:
            Bridge(fs, options.mountpoint, foreground=True, **fuse_options)
        finally:
            if tracer is not None:
                tracer.close()
        return 0
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
        status = 1
        tracer = None
        try:
            fs, tracer = _filesystem(
                reader,
                options,
                trace_out,
                on_ready=lambda: os.write(write_end, b"1"),
                attr_timeout=timeout,
            )
            Bridge(fs, options.mountpoint, foreground=True, **fuse_options)
            status = 0
        except BaseException:  # the parent reports failure; the details go to the log
            logging.exception("mount failed")
        finally:
            try:
                if tracer is not None:
                    tracer.close()
            except OSError:
                logging.exception("writing the trace failed")
            os._exit(status)
    os.close(write_end)
    if trace_out is not None:
        trace_out.close()  # the daemon holds its own copy
    ready = os.read(read_end, 1)
    os.close(read_end)
    if ready != b"1":
        os.waitpid(pid, 0)
        raise ClientError(f"mounting {options.mountpoint} failed; see {log_file}")
    return 0


def umount(mountpoint: str) -> int:
    if not os.path.ismount(mountpoint):
        raise ClientError(f"{mountpoint}: not mounted")
    try:
        objects = json.loads(os.getxattr(mountpoint, "user.stats"))["cache_dir"]
    except (OSError, ValueError, KeyError):
        objects = None  # not ours, or not answering: nothing to wait for
    command = ["fusermount", "-u", mountpoint] if os.geteuid() != 0 else ["umount", mountpoint]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClientError(f"unmounting {mountpoint} failed: {result.stderr.strip()}")
    if objects is not None:  # so that `umount && mount` on the same cache just works
        wait_until_free(os.path.dirname(objects), UMOUNT_WAIT_S)
    return 0
