"""What makes a catalog valid (docs/FORMAT.md, "Catalogs", "Validity"): the rules for
one row, which readers apply to every row they load, and the whole-catalog check that
the publish gateway and `repo-server check` run on every catalog.

Each rule has this one home, so a client refuses exactly what the gateway refuses.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from cvmfs_format import paths
from cvmfs_format.errors import FormatError
from cvmfs_format.objects import is_hash

if TYPE_CHECKING:
    from cvmfs_format.catalog import Catalog, NestedRef

SCHEMA_VERSION = "1"
FLAG_CHUNKED = 1
FLAG_NESTED_ROOT = 2
_KNOWN_FLAGS = FLAG_CHUNKED | FLAG_NESTED_ROOT
_MODE_BITS = 0o177777  # file type and permission bits; nothing above
STAT_KEYS = ("files", "dirs", "symlinks", "bytes", "catalogs")
_INTEGER = re.compile(r"0|[1-9][0-9]*")

Row = tuple[Any, ...]  # a row as SQLite returns it: the types are what is being checked


def entry_problem(row: Row) -> str | None:
    """What is wrong with one entries row (its parent aside), or None: run on every row
    a reader loads, so it is written for speed (under 1 us a row)."""
    parent, name, mode, size, mtime_ns, digest, target, link_group, flags = row
    if type(name) is not str:
        return f"name {name!r} is not text"
    if name or parent != "":
        problem = paths.name_problem(name)
        if problem is not None:
            return problem
    elif type(mode) is not int or not stat.S_ISDIR(mode):
        return "the root entry is not a directory"
    if not (
        type(mode) is int
        and type(size) is int
        and type(mtime_ns) is int
        and type(link_group) is int
        and type(flags) is int
    ):
        fields = ("mode", mode), ("size", size), ("mtime_ns", mtime_ns), ("link group", link_group)
        for what, value in (*fields, ("flags", flags)):
            if type(value) is not int:
                return f"{what} {value!r} is not an integer"
    if size < 0:
        return f"negative size {size}"
    if link_group < 0:
        return f"negative link group {link_group}"
    if flags & ~_KNOWN_FLAGS:  # a negative number has every high bit
        return f"unknown flags {flags}"
    if not 0 <= mode <= _MODE_BITS:
        return f"mode {mode:o} has bits beyond the file type and permissions"
    kind = mode & 0o170000
    if kind == stat.S_IFREG:
        if flags & FLAG_NESTED_ROOT:
            return "a regular file flagged as nested-catalog root"
        if flags & FLAG_CHUNKED:
            return None if digest is None else "chunked file with a hash of its own"
        if digest is None:
            return "regular file without hash"
        if type(digest) is str and is_hash(digest):
            return None
        return f"{digest!r} is not an object name"
    if kind == stat.S_IFDIR:
        return "a directory flagged as chunked" if flags & FLAG_CHUNKED else None
    if kind == stat.S_IFLNK:
        if flags:
            return f"a symlink with flags {flags}"
        if type(target) is not str or not target:
            return "symlink without target"
        length = len(target.encode("utf-8", "surrogatepass"))
        return None if length == size else f"symlink target of {length} bytes, size {size}"
    return f"unsupported file type {kind:o}"


def _where(parent: object, name: object) -> str:
    if parent == "" and name == "":
        return "/"
    if isinstance(parent, str) and isinstance(name, str) and "\0" not in name:
        return paths.join(parent, name) if parent else name
    return f"{parent!r} {name!r}"


def entry_error(row: Row, problem: str) -> FormatError:
    return FormatError(f"catalog entry {_where(row[0], row[1])}: {problem}")


def check_entry_row(row: Row) -> None:
    """One entries row as a reader uses it: FormatError unless it follows the rules.
    The parent is not checked: a reader asked for the rows of one parent directory."""
    problem = entry_problem(row)
    if problem is not None:
        raise entry_error(row, problem)


def check_parent(parent: object, root: str) -> str | None:
    """What is wrong with an entry's parent in a catalog rooted at root, or None."""
    if type(parent) is not str:
        return f"parent {parent!r} is not text"
    if parent == "":
        return None if root == "/" else f"the root entry in a catalog rooted at {root}"
    try:
        normal = paths.normalize(parent)
    except FormatError as exc:
        return str(exc)
    if normal != parent or not parent.startswith("/"):
        return f"parent {parent!r} is not normalised"
    if not paths.is_within(parent, root):
        return f"parent {parent} lies outside {root}"
    return None


def check_chunk_row(path: str, row: Row) -> None:
    """One chunks row (offset, size, hash) of the file at path, as readers use it."""
    offset, size, digest = row
    if type(offset) is not int or type(size) is not int:
        raise FormatError(f"{path}: chunk at {offset!r} has a size or offset that is no integer")
    if type(digest) is not str or not is_hash(digest):
        raise FormatError(f"{path}: chunk at byte {offset}: {digest!r} is not an object name")


class Span(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...


def check_chunk_list(path: str, size: int, chunks: Iterable[Span]) -> None:
    """A chunked file's chunks must tile its content exactly (docs/FORMAT.md, "Chunked
    files"): from offset 0, each where the previous ended, none empty, summing to size.
    Readers and the validators refuse a file whose list does not, so a gap can never
    read as a short file."""
    expected = 0
    for chunk in chunks:
        if chunk.offset != expected:
            raise FormatError(f"{path}: chunk list has a gap or overlap at byte {expected}")
        if chunk.size <= 0:
            raise FormatError(f"{path}: empty chunk at byte {expected}")
        expected += chunk.size
    if expected != size:
        raise FormatError(f"{path}: chunks cover {expected} of its {size} bytes")


def parse_count(text: object, what: str) -> int:
    if type(text) is not str or not _INTEGER.fullmatch(text):
        raise FormatError(f"{what} {text!r} is not a count")
    return int(text)


def check_properties(props: Mapping[str, object], digest: str) -> tuple[str, list[int]]:
    """The catalog's root and statistics (STAT_KEYS) from its properties, or FormatError."""
    if props.get("schema") != SCHEMA_VERSION:
        raise FormatError(f"catalog {digest}: unknown schema {props.get('schema')!r}")
    root = props.get("root")
    if type(root) is not str or not root.startswith("/") or paths.normalize(root) != root:
        raise FormatError(f"catalog {digest}: root {root!r} is not a normalised path")
    counts = [parse_count(props.get(k), f"catalog {digest}: statistics {k}") for k in STAT_KEYS]
    if counts[-1] < 1:
        raise FormatError(f"catalog {digest}: statistics count {counts[-1]} catalogs")
    return root, counts


def check_nested_row(row: Row, root: str, digest: str) -> None:
    """One nested row (path, hash, size, statistics) of a catalog rooted at root."""
    path, nested_hash, size, *counts = row
    where = f"catalog {digest}: nested catalog {path!r}"
    problem = check_parent(path, root)
    if problem is not None or path == root or path == "":
        raise FormatError(f"{where}: {problem or 'is the catalog itself'}")
    if type(nested_hash) is not str or not is_hash(nested_hash):
        raise FormatError(f"{where}: {nested_hash!r} is not an object name")
    if type(size) is not int or size <= 0:
        raise FormatError(f"{where}: stored size {size!r} is not positive")
    if not all(type(c) is int and c >= 0 for c in counts) or counts[-1] < 1:
        raise FormatError(f"{where}: statistics {counts!r} are not counts")


def check_root_catalog(catalog: Catalog) -> None:
    """A revision's root catalog describes the whole tree: it is rooted at /."""
    if catalog.root != "/":
        raise FormatError(f"root catalog {catalog.digest} is rooted at {catalog.root}, not /")


def check_nested_catalog(ref: NestedRef, child: Catalog) -> None:
    """A nested catalog as its parent's row names it: rooted where the row says."""
    if child.root != ref.path:
        raise FormatError(f"nested catalog {ref.hash} at {ref.path} is rooted at {child.root}")


def nested_catalog_problems(ref: NestedRef, child: Catalog, stored_size: int) -> list[str]:
    """What a nested catalog and its parent's row disagree on: its root, its stored size
    (which readers verify) and its statistics."""
    problems = []
    try:
        check_nested_catalog(ref, child)
    except FormatError as exc:
        problems.append(str(exc))
    if stored_size != ref.size:
        problems.append(
            f"nested catalog {ref.hash} at {ref.path}: stored size {stored_size}, "
            f"its row says {ref.size}"
        )
    if child.stats() != ref.stats:
        problems.append(
            f"nested catalog {ref.hash} at {ref.path}: statistics {child.stats().as_row()}, "
            f"its row says {ref.stats.as_row()}"
        )
    return problems


@dataclass(frozen=True)
class NamedObject:
    """An object a catalog names, with the content size the naming row gives it."""

    digest: str
    size: int
    path: str


@dataclass
class Validation:
    """Every problem of one catalog, and the objects its valid rows name."""

    problems: list[str] = field(default_factory=list)
    objects: list[NamedObject] = field(default_factory=list)


def validate_catalog(catalog: Catalog) -> Validation:
    """Check every row of a catalog as a reader would, and what rows must agree on:
    chunk lists, nested mountpoints, statistics (docs/FORMAT.md, "Validity")."""
    result = Validation()
    problems, objects = result.problems, result.objects
    root = catalog.root
    chunked: dict[str, int] = {}
    directories: dict[str, int] = {}
    own = [0, 0, 0, 0]  # files, dirs, symlinks, bytes
    parents: dict[object, str | None] = {}  # parent -> what is wrong with it
    for row in catalog.entry_rows():
        parent, name, mode = row[0], row[1], row[2]
        where = _where(parent, name)
        try:
            check_entry_row(row)
        except FormatError as exc:
            problems.append(str(exc))
            continue
        if parent not in parents:  # rows share parents: each is checked once
            parents[parent] = check_parent(parent, root) or _below_mountpoint(catalog, parent)
        if parents[parent] is not None:
            problems.append(f"catalog entry {where}: {parents[parent]}")
            continue
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            own[0] += 1
            own[3] += row[3]
            if row[8] & FLAG_CHUNKED:
                chunked[where] = row[3]
            else:
                objects.append(NamedObject(row[5], row[3], where))
        elif kind == stat.S_IFDIR:
            own[1] += 1
            directories[where] = row[8]
        else:
            own[2] += 1
    chunks: dict[str, list[_Chunk]] = {}
    for path, *chunk_row in catalog.chunk_rows():
        try:
            if path not in chunked:
                raise FormatError(f"{path!r}: chunk of no chunked file in this catalog")
            check_chunk_row(path, tuple(chunk_row))
        except FormatError as exc:
            problems.append(str(exc))
            continue
        chunks.setdefault(path, []).append(_Chunk(*chunk_row))
    for path, size in chunked.items():
        listed = sorted(chunks.get(path, []), key=lambda c: c.offset)
        try:
            check_chunk_list(path, size, listed)
        except FormatError as exc:
            problems.append(str(exc))
            continue
        objects.extend(NamedObject(c.hash, c.size, path) for c in listed)
    if root == "/" and "/" not in directories:
        problems.append("the root catalog has no entry for /")
    for ref in catalog.nested.values():
        if not directories.get(ref.path, 0) & FLAG_NESTED_ROOT:
            problems.append(
                f"nested catalog at {ref.path}: not a directory flagged as nested-catalog "
                "root in this catalog"
            )
    problems.extend(_statistics_problems(catalog, own))
    return result


def _below_mountpoint(catalog: Catalog, parent: str) -> str | None:
    """What is wrong with an entry under parent if that lies at or below a nested
    mountpoint: its rows belong in the nested catalog."""
    for candidate in [*paths.ancestors(parent), parent] if catalog.nested and parent else []:
        if candidate in catalog.nested:
            return f"belongs in the nested catalog at {candidate}"
    return None


class _Chunk(NamedTuple):
    offset: int
    size: int
    hash: str


def _statistics_problems(catalog: Catalog, own: list[int]) -> Iterator[str]:
    stated = catalog.stats().as_row()
    counted = [*own, 1]
    for ref in catalog.nested.values():
        counted = [a + b for a, b in zip(counted, ref.stats.as_row(), strict=True)]
    if list(stated) != counted:
        yield (
            f"statistics {dict(zip(STAT_KEYS, stated, strict=True))} do not match "
            f"its entries and nested catalogs {tuple(counted)}"
        )
