"""Repository paths: absolute, '/'-separated, normalised (docs/FORMAT.md, "Paths")."""

from __future__ import annotations

from cvmfs_format.errors import FormatError

MAX_NAME_BYTES = 255


def normalize(path: str) -> str:
    """Return the canonical form of a repository path or raise FormatError.

    Leading slash optional on input; '.', '..', empty components and NUL are refused,
    never resolved, so a path can never leave the repository.
    """
    if "\0" in path:
        raise FormatError(f"path contains a NUL byte: {path!r}")
    parts = [p for p in path.split("/") if p != ""]
    for part in parts:
        if part in (".", ".."):
            raise FormatError(f"path may not contain '.' or '..': {path!r}")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise FormatError(f"path component longer than {MAX_NAME_BYTES} bytes: {path!r}")
    return "/" + "/".join(parts)


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a normalised path; the root is ("", "")."""
    if path == "/":
        return "", ""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


def join(parent: str, name: str) -> str:
    if parent == "":
        return "/"
    return f"{parent}/{name}" if parent != "/" else f"/{name}"


def is_within(path: str, prefix: str) -> bool:
    """True if path is prefix or lies below it."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def ancestors(path: str) -> list[str]:
    """Ancestors of a normalised path, root first, the path itself excluded."""
    result = []
    while path != "/":
        path, _ = split(path)
        result.append(path)
    return result[::-1]
