"""`cvmfs-client preload`: fill a cache with a subtree, for offline use or a fast start."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from cvmfs_client.content import open_content, warm
from cvmfs_client.progress import Progress
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.catalog import Chunk, Entry

WORKERS = 8  # downloads wait on the network, not on the CPU


def _files(reader: RepositoryReader, top: Entry) -> Iterator[Entry]:
    stack = [top]
    while stack:
        entry = stack.pop()
        if entry.is_dir:
            stack.extend(reader.listdir(entry.path))
        elif entry.is_file:
            yield entry


def preload(reader: RepositoryReader, path: str = "/", progress: bool = False) -> tuple[int, int]:
    """Fetch every catalog and object below path into the reader's cache.

    Returns (files, objects). Each object is verified before it enters the cache; a
    file the mount could not read (a chunk list that does not cover it) is an error.
    """
    files = list(_files(reader, reader.lookup(path)))

    def open_file(entry: Entry) -> list[Chunk]:
        """Fetches a file stored as one object; returns a chunked file's chunks."""
        with open_content(reader, entry) as content:
            bar.update(0 if entry.chunked else entry.size)
            return content.chunks

    def fetch_chunk(chunk: Chunk) -> None:
        warm(reader, chunk)
        bar.update(chunk.size)

    total = sum(entry.size for entry in files)
    with (
        ThreadPoolExecutor(WORKERS) as pool,
        Progress("preloading", total, enabled=progress) as bar,
    ):
        chunks = {c.hash: c for listed in pool.map(open_file, files) for c in listed}
        list(pool.map(fetch_chunk, chunks.values()))
    whole = {entry.hash for entry in files if not entry.chunked}
    return len(files), len(whole | chunks.keys())
