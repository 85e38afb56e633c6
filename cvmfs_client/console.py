"""What every command line of the project shares: one-line errors, exit codes, --debug,
--version, --json, and a quiet exit when the reader of stdout went away."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import time
import traceback
from collections.abc import Callable

from cvmfs_client.errors import ClientError
from cvmfs_format.errors import CvmfsError
from cvmfs_format.version import add_version

__all__ = ["add_version", "run", "add_debug", "add_json", "print_json", "utc", "human"]

# What a shell reports for a program killed by SIGPIPE (`yes | head -1`): the same for
# ours, without a traceback or an error line.
EXIT_BROKEN_PIPE = 141


def run(
    parser: argparse.ArgumentParser,
    handler: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    """Parse argv and run handler; errors become `error: ...` on stderr and exit 1."""
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # Failover warnings belong in a daemon's log; on a terminal only --debug shows them.
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.ERROR, format="%(levelname)s: %(message)s"
    )
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_gone():  # another pipe (a tool's, a socket's): a real error
            return _error(exc, debug)
        # Nobody reads what is left (`diff | head -1`); exit as quietly as `cat` would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CvmfsError, OSError) as exc:
        return _error(exc, debug)


def _error(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of text"
    )


def print_json(document: object) -> None:
    """One JSON document on stdout, for scripts (`--json`)."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def utc(ts: float) -> str:
    """A time stamp as JSON carries it: ISO 8601 in UTC, e.g. 2026-12-01T21:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def add_debug(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    # On a subcommand the default must not overwrite a --debug given before it.
    default = argparse.SUPPRESS if subcommand else False
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )


def human(n: float) -> str:
    """Bytes for people: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'4G', '500M', '1024' (bytes; K, M, G, T are powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    if not number.isdigit():
        raise ClientError(f"size {text!r}: expected a number with an optional K, M, G or T")
    return int(number) * factor
