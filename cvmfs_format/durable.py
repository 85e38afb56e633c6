"""Writing a file so that a crash at any moment leaves the old file or the whole new one:
a temporary file beside it, fsync, rename (or link), fsync of the directory.

Every file that must survive a crash goes through write_atomic: objects, keys, tokens,
the manifest and whitelist, the client's remembered revision and offline manifest, the
publisher's stat cache.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket

TMP_PREFIX = ".tmp-"  # a writer's file in progress; a crash can leave one behind
_HOST = socket.gethostname()
_RUN = secrets.token_hex(4)  # this process's, so names stay unique across pid reuse
_serial = itertools.count()  # next() on it is atomic under the GIL


def temporary_name() -> str:
    """A name for a file in progress that says who writes it: .tmp-<pid>@<host>-<id>,
    the id a random one per process and a serial number (a name from secrets each time
    cost 3% of a cold publish)."""
    return f"{TMP_PREFIX}{os.getpid()}@{_HOST}-{_RUN}{next(_serial)}"


def writer_is_gone(name: str) -> bool:
    """Whether the temporary file `name` was left by a process of this host that no
    longer runs: then it can be removed at once, whatever its age."""
    writer = name.removeprefix(TMP_PREFIX).rpartition("-")[0]
    pid, _, host = writer.partition("@")
    if not pid.isdigit() or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | memoryview,
    *,
    mode: int = 0o644,
    durable: bool = True,
    replace: bool = True,
) -> bool:
    """Write data to path atomically; returns False when replace is off and path exists.

    durable=False skips both fsyncs, for writers that make a whole batch durable at once
    before anything names it (a repository's objects: LocalStorage.sync runs before the
    manifest is written). replace=False never overwrites: the file is linked into place,
    which fails if path exists (keys, objects).
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, temporary_name())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        sync_directory(directory)
    return True


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the names in a directory durable (after a rename or link into it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
