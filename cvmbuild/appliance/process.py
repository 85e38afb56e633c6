"""The one way the appliance builder runs external tools: logged, stderr captured, and a
failure raised as ToolError carrying the tool's own message."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from cvmbuild.appliance.errors import ToolError
from cvmbuild.boinc.tools import missing_message

log = logging.getLogger("cvmbuild.appliance")

# Which Debian package brings each tool, for the error that says what to install.
TOOL_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "mksquashfs": "squashfs-tools",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "syslinux": "syslinux",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "dpkg-deb": "dpkg",
    "chroot": "coreutils",
}


def require(*tools: str) -> None:
    """Fail early, naming the package to install, if a tool is not on PATH."""
    message = missing_message(tools, TOOL_PACKAGES)
    if message:
        raise ToolError(message)


def run(
    command: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    capture: bool = True,
) -> bytes:
    """Run command; return its stdout. On failure raise ToolError with the tail of its
    stderr. capture=False lets its output through to our own stdout and stderr."""
    args = [os.fspath(a) for a in command]
    log.info("+ %s", shlex.join(args))
    try:
        result = subprocess.run(
            args,
            input=stdin,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env={**os.environ, **env} if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        require(args[0])
        raise ToolError(f"{args[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        message = (result.stderr or b"").decode(errors="replace").strip()
        tail = "\n".join(message.splitlines()[-15:]) or "(no output on stderr)"
        raise ToolError(f"{os.path.basename(args[0])} exited {result.returncode}: {tail}")
    return result.stdout or b""
