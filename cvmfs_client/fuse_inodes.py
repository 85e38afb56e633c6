"""The inodes the kernel knows, with the lookup counts that say when it forgot them.

A directory's inode is fixed by its path; a file's or symlink's by its path and content
(its object hash, chunk hashes or target), so what an inode holds never changes and
the kernel may keep its pages for ever. An inode of an older revision keeps resolving
until the kernel forgets it: an fd or mmap opened before a switch reads its revision.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from cvmfs_client.fuse_lowlevel import ROOT_INODE
from cvmfs_format.catalog import Chunk, Entry

__all__ = ["ROOT_INODE", "InodeTable", "Node", "content_key"]


def content_key(entry: Entry, chunks: list[Chunk] | None) -> str:
    """What makes two entries at one path the same inode: a directory is its path; a
    file its content; a symlink its target."""
    if entry.is_dir:
        return ""
    if entry.is_symlink:
        return f"->{entry.target}"
    if chunks is not None:
        digest = hashlib.sha256("".join(c.hash for c in chunks).encode()).hexdigest()
        return f"chunks:{digest}:{entry.size}"
    return f"{entry.hash}:{entry.size}"


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    path: str
    key: str  # content_key
    entry: Entry  # a directory's is updated on revision switches; others never change
    chunks: list[Chunk] | None = None  # a chunked file's, from its own revision
    lookups: int = 0
    state: object = None  # what the reader keeps per inode (a chunked file's read-ahead)
    failed: bool = False  # a read of it failed: counted once, however often the kernel retries
    listing: int | None = None  # a directory's listing signature last sent (None: never)


@dataclass(frozen=True)
class DirectoryView:
    """A directory as the kernel may cache it, copied out for invalidation."""

    ino: int
    path: str
    entry: Entry
    children: dict[str, str]  # name -> content key of the inode the kernel holds
    negatives: frozenset[str]
    listing: int | None


class InodeTable:
    """Thread-safe. Inode numbers are never reused while the mount lives."""

    def __init__(self, root: Entry):
        self._lock = threading.Lock()
        self._next = ROOT_INODE + 1
        self._by_ino: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "/", "", root, lookups=1)}
        self._by_key: dict[tuple[str, str], int] = {("/", ""): ROOT_INODE}
        # Per directory inode, the names the kernel may cache: positive ones (name ->
        # inode) and negative ones. Apart from the nodes: most nodes are files.
        self._children: dict[int, dict[str, int]] = {}
        self._negatives: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Node:
        """KeyError for an inode the kernel was told to forget (it never asks)."""
        return self._by_ino[ino]

    def node(self, entry: Entry, chunks: list[Chunk] | None) -> Node:
        """The inode of entry (created with no lookups if new): pass it to looked_up
        once the kernel has been told about it, or to unused if it was not."""
        key = content_key(entry, chunks)
        with self._lock:
            ino = self._by_key.get((entry.path, key))
            if ino is not None:
                node = self._by_ino[ino]
                if entry.is_dir:  # looked up at a newer revision than its invalidation
                    node.entry = entry
                return node
            ino, self._next = self._next, self._next + 1
            node = Node(ino, entry.path, key, entry, chunks)
            self._by_ino[ino] = node
            self._by_key[entry.path, key] = ino
            return node

    def looked_up(self, parent: int, name: str, node: Node) -> None:
        with self._lock:
            node.lookups += 1
            if parent in self._by_ino:
                self._children.setdefault(parent, {})[name] = node.ino
                self._negatives.get(parent, set()).discard(name)

    def unused(self, node: Node) -> None:
        with self._lock:
            if node.lookups == 0:
                self._drop(node)

    def missing(self, parent: int, name: str) -> None:
        """The kernel caches that name is not in parent."""
        with self._lock:
            if parent in self._by_ino:
                self._negatives.setdefault(parent, set()).add(name)
                self._children.get(parent, {}).pop(name, None)

    def listed(self, ino: int, signature: int) -> None:
        with self._lock:
            node = self._by_ino.get(ino)
            if node is not None:
                node.listing = signature

    def forget(self, ino: int, count: int) -> None:
        with self._lock:
            node = self._by_ino.get(ino)
            if node is None or ino == ROOT_INODE:
                return
            node.lookups -= count
            if node.lookups <= 0:
                self._drop(node)

    def _drop(self, node: Node) -> None:
        del self._by_ino[node.ino]
        del self._by_key[node.path, node.key]
        self._children.pop(node.ino, None)
        self._negatives.pop(node.ino, None)
        parent_path, _, name = node.path.rpartition("/")
        siblings = self._children.get(self._by_key.get((parent_path or "/", ""), 0), {})
        if siblings.get(name) == node.ino:
            del siblings[name]

    def directories(self) -> list[DirectoryView]:
        with self._lock:
            return [
                DirectoryView(
                    n.ino,
                    n.path,
                    n.entry,
                    {
                        name: self._by_ino[i].key
                        for name, i in self._children.get(n.ino, {}).items()
                    },
                    frozenset(self._negatives.get(n.ino, ())),
                    n.listing,
                )  # fmt: skip
                for n in self._by_ino.values()
                if n.entry.is_dir
            ]

    def settle(self, ino: int, entry: Entry, listing_dropped: bool) -> None:
        """After invalidation: a directory's entry at the new revision, and whether the
        kernel's cached listing of it was dropped. Invalidated names stay recorded: a
        second invalidation of a name the kernel no longer has costs only an ENOENT."""
        with self._lock:
            node = self._by_ino.get(ino)
            if node is None:
                return
            node.entry = entry
            if listing_dropped:
                node.listing = None
