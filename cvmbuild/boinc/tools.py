"""The one way the VM wrapper runs the short-lived tools it needs (qemu-img, mkfs.fat,
mtools): stderr captured, a failure raised as ToolError with the tool's own message,
and a missing tool named with the Debian package that brings it."""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger("cvmbuild.boinc")

TOOL_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdir": "mtools",
}


class ToolError(Exception):
    """An external tool is missing or failed; the message says which and why."""


def missing_message(tools: Sequence[str], packages: Mapping[str, str]) -> str | None:
    """What to install when some of tools are not on PATH (packages: tool -> Debian
    package), or None; the appliance builder's require says it the same way."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return None
    names = sorted({packages.get(tool, tool) for tool in missing})
    return f"{', '.join(missing)} not found: install it with `apt-get install {' '.join(names)}`"


def require(*tools: str) -> None:
    message = missing_message(tools, TOOL_PACKAGES)
    if message:
        raise ToolError(message)


def run(
    command: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """Run command to completion and return its stdout."""
    args = [os.fspath(a) for a in command]
    log.info("+ %s", shlex.join(args))
    try:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=cwd,
            env={**os.environ, **env} if env is not None else None,
        )
    except FileNotFoundError as exc:
        require(args[0])
        if cwd is not None and not os.path.isdir(cwd):
            raise ToolError(f"{args[0]}: the directory {os.fspath(cwd)} does not exist") from exc
        raise ToolError(f"{args[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        tail = "\n".join(message.splitlines()[-10:]) or "(no output on stderr)"
        raise ToolError(f"{os.path.basename(args[0])} exited {result.returncode}: {tail}")
    return result.stdout


_PR_SET_PDEATHSIG = 1


def dies_with_parent() -> Callable[[], None]:
    """A preexec_fn that makes the child die (SIGKILL) when the process that starts it
    does: neither QEMU nor a task may outlive the wrapper. prctl is looked up before
    the fork; BOINC's timer thread is a C thread that never holds a Python lock, and
    glibc's malloc is fork-safe, so this preexec_fn does not risk the deadlock Python
    warns about for Python threads. PR_SET_PDEATHSIG follows the thread that forks:
    start children from the main thread."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec
