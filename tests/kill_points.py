"""Killing a command with SIGKILL at a chosen commit point: just before the k-th rename,
link or unlink it makes. Every state a crash can leave on disk lies between two such
calls, so running a command killed at k = 1, 2, ... reaches each of them in turn,
deterministically, without a hook in the program itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Runs a console script's main() with the os module's commit calls counted; the process
# kills itself (SIGKILL, nothing flushed or cleaned up) just before call number POINT.
_KILLER = """
import os, signal, sys

point, module, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
calls = 0
if point == 0:  # count only: report the number of calls at exit
    import atexit

    atexit.register(lambda: os.write(2, f"\\ncommit calls: {calls}\\n".encode()))


def counted(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == point:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return call


for name in ("rename", "replace", "link", "unlink"):
    setattr(os, name, counted(getattr(os, name)))
main = __import__(module, fromlist=["main"]).main
sys.exit(main(argv))
"""

PROGRAMS = {"repo-server": "repo_server.cli", "cvmbuild": "cvmbuild.cli"}


def run_killed_at(
    point: int, program: str, *argv: str | os.PathLike[str], timeout: float = 300
) -> subprocess.CompletedProcess[bytes]:
    """Run `program argv` killed just before its commit call number `point` (1 is the
    first; 0 never kills); returncode -SIGKILL if it got there, else the command's own
    exit code."""
    cmd = [sys.executable, "-c", _KILLER, str(point), PROGRAMS[program], *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=Path.cwd())


def count_commit_calls(program: str, *argv: str | os.PathLike[str], timeout: float = 300) -> int:
    """Run `program argv` to the end; how many commit calls it made (it must succeed)."""
    result = run_killed_at(0, program, *argv, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{program} {argv} exited {result.returncode}: {result.stderr!r}")
    return int(result.stderr.decode().rpartition("commit calls: ")[2])


def was_killed(result: subprocess.CompletedProcess[bytes]) -> bool:
    return result.returncode == -signal.SIGKILL
