"""The prefetcher's order of work, without FUSE: what a reader will need soonest first."""

from __future__ import annotations

import hashlib
import stat
import threading

from cvmfs_client.prefetch import SIBLING_MAX, Prefetcher
from cvmfs_format.catalog import FLAG_CHUNKED, Chunk, Entry


def _file(path: str, size: int, *, chunked: bool = False) -> Entry:
    digest = hashlib.sha256(path.encode()).hexdigest()
    flags = FLAG_CHUNKED if chunked else 0
    return Entry(path, stat.S_IFREG | 0o644, size, 0, None if chunked else digest, None, 0, flags)


class Recorder:
    """One worker that waits until released, so that the whole queue is in place before
    the first item is taken; records what it fetched, in order."""

    def __init__(self, room: bool = True):
        self.fetched: list[str] = []
        self.go = threading.Event()
        self.done = threading.Semaphore(0)
        self.prefetcher = Prefetcher(self._warm, lambda size: room, workers=1)

    def _warm(self, chunk: Chunk) -> None:
        self.go.wait(10)
        self.fetched.append(chunk.hash)
        self.done.release()

    def run(self, expected: int) -> list[str]:
        self.go.set()
        for _ in range(expected):
            assert self.done.acquire(timeout=10), self.fetched
        self.prefetcher.close()
        return self.fetched


def test_files_like_the_opened_one_come_first_then_smaller_before_larger() -> None:
    opened = _file("/pkg/a.so", 10)
    others = [
        _file("/pkg/z.py", 5),
        _file("/pkg/b.so", 300),
        _file("/pkg/c.so", 20),
        _file("/pkg/y.py", 1),
    ]
    r = Recorder()
    r.prefetcher.siblings(opened, [opened, *others], lambda digest: False)
    names = {e.hash: e.name for e in others}
    assert [names[h] for h in r.run(4)] == ["c.so", "b.so", "y.py", "z.py"]


def test_the_newest_directory_and_a_sequential_reader_go_before_older_directories() -> None:
    old = [_file("/old/x.py", 1), _file("/old/y.py", 2)]
    new = [_file("/new/x.py", 1), _file("/new/y.py", 2)]
    r = Recorder()
    blocker = Chunk(0, 1, "f" * 64)
    r.prefetcher.chunks([blocker])  # taken at once; the worker waits with it
    r.prefetcher.siblings(old[0], old, lambda digest: False)
    r.prefetcher.siblings(new[0], new, lambda digest: False)
    ahead = Chunk(0, 1, "e" * 64)
    r.prefetcher.chunks([ahead])
    assert r.run(4) == [blocker.hash, ahead.hash, new[1].hash, old[1].hash]


def test_chunked_large_cached_and_non_files_are_not_prefetched() -> None:
    opened = _file("/pkg/a.py", 1)
    wanted = _file("/pkg/b.py", 1)
    cached = _file("/pkg/c.py", 1)
    directory = Entry("/pkg/sub", stat.S_IFDIR | 0o755, 0, 0, None, None, 0, 0)
    children = [
        opened,
        wanted,
        cached,
        directory,
        _file("/pkg/big.bin", 100 << 20, chunked=True),
        _file("/pkg/huge.dat", SIBLING_MAX + 1),
    ]
    r = Recorder()
    r.prefetcher.siblings(opened, children, lambda digest: digest == cached.hash)
    assert r.run(1) == [wanted.hash]
    assert r.fetched == [wanted.hash]


def test_a_nearly_full_cache_gets_no_speculative_work_but_still_the_next_chunks() -> None:
    r = Recorder(room=False)
    siblings = [_file("/pkg/a.py", 1), _file("/pkg/b.py", 1), _file("/pkg/c.py", 1)]
    r.prefetcher.siblings(siblings[0], siblings, lambda digest: False)
    ahead = Chunk(0, 1, "e" * 64)
    r.prefetcher.chunks([ahead])
    assert r.run(1) == [ahead.hash]
    assert r.fetched == [ahead.hash]


def test_a_worker_goes_on_after_an_unexpected_error() -> None:
    fetched: list[str] = []
    done = threading.Semaphore(0)

    def warm(chunk: Chunk) -> None:
        try:
            if chunk.hash == "a" * 64:
                raise OSError(28, "No space left on device")
            fetched.append(chunk.hash)
        finally:
            done.release()

    prefetcher = Prefetcher(warm, lambda size: True, workers=1)
    prefetcher.chunks([Chunk(0, 1, "a" * 64), Chunk(1, 1, "b" * 64)])
    for _ in range(2):
        assert done.acquire(timeout=10), fetched
    prefetcher.close()
    assert fetched == ["b" * 64]


def test_a_queued_sibling_that_a_reader_now_needs_goes_first_and_once() -> None:
    files = [_file("/pkg/a.py", 1), _file("/pkg/b.py", 2), _file("/pkg/c.py", 3)]
    r = Recorder()
    blocker = Chunk(0, 1, "f" * 64)
    r.prefetcher.chunks([blocker])
    r.prefetcher.siblings(files[0], files, lambda digest: False)
    r.prefetcher.chunks([Chunk(0, 3, files[2].hash)])  # c.py, queued as a sibling
    assert r.run(3) == [blocker.hash, files[2].hash, files[1].hash]
    assert r.fetched.count(files[2].hash) == 1
