"""Prefetch bundles: the `.cvmfsbundle-<trigger>` file that lists what a program reads
after it touches its trigger (docs/FORMAT.md, "Prefetch bundles").

A bundle is a plain file of the tree, so the signed catalog chain covers it; these
functions only turn its bytes into members and back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cvmfs_format import paths
from cvmfs_format.errors import FormatError

PREFIX = ".cvmfsbundle-"
NAME = "CVMFS_BUNDLE"  # CernVM-FS's marker (cvmfs PR #4002), so either client reads ours
VERSION = "1.0.0"
MAX_BUNDLE_SIZE = 4 << 20  # a reader refuses larger bundle files
MAX_MEMBERS = 100_000

Range = tuple[int, int]  # [start, end) bytes of a chunked member


@dataclass(frozen=True)
class Bundle:
    members: list[str]  # absolute repository paths, in first-access order
    ranges: dict[str, list[Range]] = field(default_factory=dict)  # chunked members only


def bundle_name(trigger: str) -> str:
    """The file name of the bundle that the file named trigger triggers."""
    return PREFIX + trigger


def is_bundle_name(name: str) -> bool:
    return name.startswith(PREFIX) and len(name) > len(PREFIX)


def encode(bundle: Bundle, generator: str | None = None) -> bytes:
    document: dict[str, object] = {
        "name": NAME,
        "version": VERSION,
        "encoding": "UTF-8",
        "dependencies": bundle.members,
    }
    if generator is not None:
        document["generator"] = generator
    if bundle.ranges:
        document["ranges"] = {p: [list(r) for r in rs] for p, rs in bundle.ranges.items()}
    return (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode()


def _range(value: object, where: str) -> Range:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise FormatError(f"{where}: a range is [start, end) with 0 <= start < end")
    return value[0], value[1]


def decode(data: bytes, bundle_path: str) -> Bundle:
    """The members of the bundle file at bundle_path (a repository path). Paths without
    a leading `/` are relative to the bundle's directory, as CernVM-FS reads them."""
    if len(data) > MAX_BUNDLE_SIZE:
        raise FormatError(f"{bundle_path}: bundle larger than {MAX_BUNDLE_SIZE} bytes")
    try:
        document = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{bundle_path}: not a JSON bundle: {exc}") from None
    if not isinstance(document, dict) or document.get("name") != NAME:
        raise FormatError(f'{bundle_path}: not a bundle (no "name": "{NAME}")')
    if not str(document.get("version", "")).startswith("1."):
        raise FormatError(f"{bundle_path}: bundle version {document.get('version')!r} unknown")
    listed = document.get("dependencies")
    if not isinstance(listed, list) or len(listed) > MAX_MEMBERS:
        raise FormatError(f'{bundle_path}: "dependencies" is not a list of paths')
    directory = paths.split(bundle_path)[0]
    members: list[str] = []
    for item in listed:
        if not isinstance(item, str):
            raise FormatError(f"{bundle_path}: dependency {item!r} is not a path")
        relative = item[2:] if item.startswith("./") else item
        path = item if item.startswith("/") else f"{directory.rstrip('/')}/{relative}"
        members.append(paths.normalize(path))
    ranges: dict[str, list[Range]] = {}
    given = document.get("ranges", {})
    if not isinstance(given, dict):
        raise FormatError(f'{bundle_path}: "ranges" is not an object')
    for path, spans in given.items():
        if not isinstance(spans, list):
            raise FormatError(f"{bundle_path}: ranges of {path} are not a list")
        ranges[paths.normalize(path)] = [_range(s, f"{bundle_path}: {path}") for s in spans]
    return Bundle(members, ranges)
