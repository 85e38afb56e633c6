"""The product's version: one number for every program (`--version`, user agents)."""

from __future__ import annotations

import argparse
import functools
from importlib import metadata

DISTRIBUTION = "cvmfs-py"


@functools.cache  # a scan of the installed distributions: each new connection asks for it
def product_version() -> str:
    """The installed distribution's version (pyproject.toml is its one source); a copy
    without package metadata (the appliance's) says "unknown"."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version` on a program's top-level parser: its name and the product version."""
    parser.add_argument("--version", action="version", version=f"{parser.prog} {product_version()}")
