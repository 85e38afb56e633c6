"""The inode table without FUSE: which inode the kernel is given for an entry of some
revision, and when it may be dropped (what replaced page_cache.py's direct-I/O rules:
content under an inode never changes, so nothing needs reading past the page cache)."""

from __future__ import annotations

import stat

from cvmfs_client.fuse_inodes import ROOT_INODE, InodeTable
from cvmfs_format.catalog import FLAG_CHUNKED, Chunk, Entry

ROOT = Entry("/", stat.S_IFDIR | 0o755, 0, 0, None, None, 0, 0)


def file(path: str, digest: str, size: int = 10, mtime: int = 1) -> Entry:
    return Entry(path, stat.S_IFREG | 0o644, size, mtime, digest, None, 0, 0)


def directory(path: str, mtime: int = 1) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755, 0, mtime, None, None, 0, 0)


def looked_up(table: InodeTable, entry: Entry, chunks: list[Chunk] | None = None) -> int:
    node = table.node(entry, chunks)
    table.looked_up(ROOT_INODE, entry.path.rpartition("/")[2], node)
    return node.ino


def test_a_path_with_the_same_content_keeps_its_inode_and_new_content_gets_another() -> None:
    table = InodeTable(ROOT)
    old = looked_up(table, file("/f", "aa" * 32))
    assert looked_up(table, file("/f", "aa" * 32)) == old
    # Republished with the same size and mtime: only the bytes differ, and so the inode.
    new = looked_up(table, file("/f", "bb" * 32))
    assert new != old
    assert table.get(old).entry.hash == "aa" * 32  # the old revision's still resolves
    assert table.get(new).entry.hash == "bb" * 32


def test_a_directory_keeps_its_inode_and_takes_its_newest_attributes() -> None:
    table = InodeTable(ROOT)
    first = looked_up(table, directory("/d", mtime=1))
    assert looked_up(table, directory("/d", mtime=2)) == first
    assert table.get(first).entry.mtime_ns == 2


def test_a_chunked_file_is_its_chunk_list() -> None:
    table = InodeTable(ROOT)
    entry = Entry("/big", stat.S_IFREG | 0o644, 20, 1, None, None, 0, FLAG_CHUNKED)
    one = [Chunk(0, 10, "aa" * 32), Chunk(10, 10, "bb" * 32)]
    other = [Chunk(0, 10, "aa" * 32), Chunk(10, 10, "cc" * 32)]
    ino = looked_up(table, entry, one)
    assert looked_up(table, entry, list(one)) == ino
    assert looked_up(table, entry, other) != ino
    assert table.get(ino).chunks == one


def test_an_inode_goes_when_the_kernel_forgets_its_last_lookup() -> None:
    table = InodeTable(ROOT)
    ino = looked_up(table, file("/f", "aa" * 32))
    looked_up(table, file("/f", "aa" * 32))
    assert len(table) == 2
    table.forget(ino, 1)
    assert table.get(ino).lookups == 1
    table.forget(ino, 1)
    assert len(table) == 1  # back to the root alone
    assert looked_up(table, file("/f", "aa" * 32)) != ino  # numbers are never reused
    table.forget(ROOT_INODE, 1)  # the kernel never forgets the root; a bug would not drop it
    assert table.get(ROOT_INODE).path == "/"


def test_an_entry_the_kernel_was_never_sent_is_dropped_at_once() -> None:
    table = InodeTable(ROOT)
    node = table.node(file("/f", "aa" * 32), None)  # a READDIRPLUS reply that was full
    table.unused(node)
    assert len(table) == 1


def test_directories_record_the_names_the_kernel_may_cache() -> None:
    table = InodeTable(ROOT)
    looked_up(table, file("/f", "aa" * 32))
    table.missing(ROOT_INODE, "absent")
    table.listed(ROOT_INODE, 1234)
    (root,) = table.directories()
    assert root.children == {"f": "aa" * 32 + ":10"}
    assert root.negatives == {"absent"}
    assert root.listing == 1234
    table.settle(ROOT_INODE, ROOT, listing_dropped=True)
    assert table.directories()[0].listing is None
