"""Repository paths: absolute, '/'-separated, normalised (docs/FORMAT.md, "Paths")."""

from __future__ import annotations

from cvmfs_format.errors import FormatError

MAX_NAME_BYTES = 255
# A name of at most this many characters is at most MAX_NAME_BYTES of UTF-8 (4 bytes
# each at most): only longer ones need encoding, which keeps the rule cheap.
_SURELY_SHORT = MAX_NAME_BYTES // 4


def name_problem(name: str) -> str | None:
    """What is wrong with one path component (a catalog entry's name), or None."""
    if not name:
        return "empty name"
    if "/" in name:
        return f"name {name!r} contains '/'"
    if "\0" in name:
        return f"name {name!r} contains a NUL byte"
    if name in (".", ".."):
        return f"name {name!r}: may not be '.' or '..'"
    if len(name) > _SURELY_SHORT:
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            return f"name of {size} bytes: at most {MAX_NAME_BYTES} bytes"
    return None


def normalize(path: str) -> str:
    """Return the canonical form of a repository path or raise FormatError.

    Leading slash optional on input; '.', '..', empty components and NUL are refused,
    never resolved, so a path can never leave the repository; so is text that is not
    strictly UTF-8 (a lone surrogate), which no catalog could store.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError(f"path is not valid UTF-8 ({exc.reason}): {path!r}") from None
    parts = [p for p in path.split("/") if p != ""]
    for part in parts:
        problem = name_problem(part)
        if problem is not None:
            raise FormatError(f"path {path!r}: {problem}")
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
