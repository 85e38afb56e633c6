"""What every command line of the project shares: one-line errors, exit codes, --debug."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from cvmfs_client.errors import ClientError
from cvmfs_format.errors import CvmfsError


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
        return handler(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CvmfsError, OSError) as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1


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
