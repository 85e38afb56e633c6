"""`cvmfs-client preload`: fill a cache with a subtree, for offline use or a fast start."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from cvmfs_client.repository import RepositoryReader
from cvmfs_format.catalog import Entry

WORKERS = 8  # downloads wait on the network, not on the CPU


def _files(reader: RepositoryReader, top: Entry) -> Iterator[Entry]:
    stack = [top]
    while stack:
        entry = stack.pop()
        if entry.is_dir:
            stack.extend(reader.listdir(entry.path))
        elif entry.is_file:
            yield entry


def _objects(reader: RepositoryReader, entry: Entry) -> list[tuple[str, int]]:
    if not entry.chunked:
        assert entry.hash is not None
        return [(entry.hash, entry.size)]
    return [(c.hash, c.size) for c in reader.chunks(entry)]


def preload(reader: RepositoryReader, path: str = "/") -> tuple[int, int]:
    """Fetch every catalog and object below path into the reader's cache.

    Returns (files, objects). Each object is verified before it enters the cache.
    """
    objects: dict[str, int] = {}
    files = 0
    for entry in _files(reader, reader.lookup(path)):
        files += 1
        objects.update(_objects(reader, entry))

    def load(item: tuple[str, int]) -> None:
        digest, size = item
        reader.close_object(digest, reader.open_object(digest, size))

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(load, objects.items()))
    return files, len(objects)
