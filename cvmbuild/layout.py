"""Cutting a published tree into nested catalogs and writing them, deepest first.

A directory becomes a catalog root when it is the published prefix, when it holds a
`.cvmfscatalog` marker, or when its subtree is too large (the heaviest subdirectories
are split off until a catalog holds at most `max_entries` rows where possible).
"""

from __future__ import annotations

import hashlib
import stat
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from cvmbuild.ingest import FileContent
from cvmbuild.scan import SourceEntry
from cvmfs_format import paths
from cvmfs_format.catalog import FLAG_CHUNKED, FLAG_NESTED_ROOT, SCHEMA_VERSION, NestedRef
from cvmfs_format.catalog_writer import CatalogBuilder, EntryRow, StoredCatalog, Subtree
from cvmfs_format.store import ObjectSink

MARKER = ".cvmfscatalog"
DEFAULT_MAX_ENTRIES = 4096


@dataclass
class LayoutResult:
    subtree: Subtree
    catalogs: dict[str, NestedRef]  # logical digest → stored catalog, for the stat cache
    new_bytes: int
    catalogs_written: int


def repo_path(prefix: str, relpath: str) -> str:
    if not relpath:
        return prefix
    return f"{prefix}/{relpath}" if prefix != "/" else f"/{relpath}"


def choose_catalog_roots(entries: list[SourceEntry], max_entries: int) -> set[str]:
    """Relpaths of the directories that get their own catalog ("" is always one)."""
    children: dict[str, list[SourceEntry]] = defaultdict(list)
    for entry in entries[1:]:
        children[entry.relpath.rpartition("/")[0]].append(entry)
    roots = {""}
    weight: dict[str, int] = {}
    dirs = [e.relpath for e in entries if e.is_dir]
    for d in sorted(dirs, key=lambda p: p.count("/") if p else -1, reverse=True):
        kids = children.get(d, [])
        if any(k.relpath.rpartition("/")[2] == MARKER and k.is_file for k in kids):
            roots.add(d)
        open_dirs = [k.relpath for k in kids if k.is_dir and k.relpath not in roots]
        total = len(kids) + sum(weight[k] - 1 for k in open_dirs)
        for k in sorted(open_dirs, key=lambda k: weight[k], reverse=True):
            if total <= max_entries:
                break
            if weight[k] > 1:
                roots.add(k)
                total -= weight[k] - 1
        weight[d] = 1 if d in roots else total + 1
    return roots


def _link_groups(
    entries: list[SourceEntry], owner: Callable[[SourceEntry], str], warn: Callable[[str], None]
) -> dict[str, int]:
    """relpath → hard-link group number, unique within the owning catalog."""
    by_inode: dict[tuple[int, int], list[SourceEntry]] = defaultdict(list)
    for entry in entries:
        if entry.is_file and entry.nlink > 1:
            by_inode[(entry.dev, entry.ino)].append(entry)
    groups: dict[str, int] = {}
    counters: dict[str, int] = defaultdict(int)
    for members in by_inode.values():
        per_catalog: dict[str, list[SourceEntry]] = defaultdict(list)
        for m in members:
            per_catalog[owner(m)].append(m)
        if len(per_catalog) > 1:
            warn(
                f"warning: hard links {', '.join(m.abspath for m in members)} span nested "
                "catalogs; they are published as separate files with identical content"
            )
        for catalog, group in per_catalog.items():
            if len(group) < 2:
                continue
            counters[catalog] += 1
            for m in group:
                groups[m.relpath] = counters[catalog]
    return groups


def build_catalogs(
    storage: ObjectSink,
    prefix: str,
    entries: list[SourceEntry],
    contents: dict[str, FileContent],
    *,
    compressor: zstandard.ZstdCompressor,
    previous: dict[str, NestedRef],
    max_entries: int = DEFAULT_MAX_ENTRIES,
    warn: Callable[[str], None] = print,
) -> LayoutResult:
    roots = choose_catalog_roots(entries, max_entries)
    owner_of_dir: dict[str, str] = {}

    def owner(entry: SourceEntry) -> str:
        return owner_of_dir[entry.relpath.rpartition("/")[0]]

    for entry in entries:
        if entry.is_dir:
            if entry.relpath in roots:
                owner_of_dir[entry.relpath] = entry.relpath
            else:
                owner_of_dir[entry.relpath] = owner(entry)
    links = _link_groups(entries, owner, warn)

    rows: dict[str, list[EntryRow]] = defaultdict(list)
    chunk_rows: dict[str, list[tuple[str, int, int, str]]] = defaultdict(list)
    top = entries[0]
    if prefix == "/":
        rows[""].append(("", "", top.mode, 0, top.mtime_ns, None, None, 0, 0))
    for entry in entries[1:]:
        path = repo_path(prefix, entry.relpath)
        parent, name = paths.split(path)
        cat = owner(entry)
        flags, digest, size = 0, None, entry.size
        if entry.is_file:
            content = contents[entry.relpath]
            digest = content.hash
            if content.chunks:
                flags |= FLAG_CHUNKED
                chunk_rows[cat].extend((path, c.offset, c.size, c.hash) for c in content.chunks)
        elif entry.is_dir and entry.relpath in roots:
            flags |= FLAG_NESTED_ROOT
        target = entry.target
        if target is not None:
            size = len(target.encode("utf-8"))
        rows[cat].append(
            (
                parent,
                name,
                entry.mode,
                size,
                entry.mtime_ns,
                digest,
                target,
                links.get(entry.relpath, 0),
                flags,
            )
        )

    stored: dict[str, StoredCatalog] = {}
    reusable: dict[str, NestedRef] = {}
    new_bytes = written = 0
    for root in sorted(roots, key=lambda p: p.count("/") if p else -1, reverse=True):
        root_path = repo_path(prefix, root)
        nested = sorted(
            r for r in roots if r and r != root and owner_of_dir[r.rpartition("/")[0]] == root
        )
        refs = [
            NestedRef(repo_path(prefix, r), stored[r].hash, stored[r].size, stored[r].stats)
            for r in nested
        ]
        digest = hashlib.sha256(
            repr(
                (
                    SCHEMA_VERSION,
                    root_path,
                    sorted(rows[root], key=lambda r: (r[0], r[1])),
                    sorted(chunk_rows[root]),
                    refs,
                )
            ).encode()
        ).hexdigest()
        old = previous.get(digest)
        if old is not None and storage.has(old.hash):
            stored[root] = StoredCatalog(old.hash, old.size, old.stats, 0)
        else:
            builder = CatalogBuilder(root_path)
            builder.add_entries(rows[root])
            builder.add_chunks(chunk_rows[root])
            for ref in refs:
                builder.add_nested(ref)
            stored[root] = builder.finish(storage, compressor)
            new_bytes += stored[root].new_bytes
            written += 1 if stored[root].new_bytes else 0  # already stored: nothing uploaded
        s = stored[root]
        reusable[digest] = NestedRef(root_path, s.hash, s.size, s.stats)
    mode = top.mode if stat.S_ISDIR(top.mode) else stat.S_IFDIR | 0o755
    return LayoutResult(
        Subtree(prefix, stored[""], mode, top.mtime_ns), reusable, new_bytes, written
    )
