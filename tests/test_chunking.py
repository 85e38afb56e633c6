"""A large file read in segments is cut into exactly the chunks that cutting it whole
gives: releases keep sharing chunks whatever the segment size, and a file is stored as
the same objects whether it was published before or after the switch from mmap."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmbuild.chunking import ChunkPolicy, cut_segments

# FastCDC's smallest sizes, so that short examples hold many chunks.
SMALL = ChunkPolicy(threshold=0, min_size=64, avg_size=256, max_size=1024)

# Random runs (content-defined cuts) and runs of one byte (cuts at max_size only).
runs = st.lists(st.tuples(st.booleans(), st.integers(0, 3000), st.integers(0, 2**32)), max_size=12)


def content_of(spec: list[tuple[bool, int, int]]) -> bytes:
    return b"".join(
        random.Random(seed).randbytes(n) if noisy else bytes([seed % 256]) * n
        for noisy, n, seed in spec
    )


def reader(data: bytes):  # type: ignore[no-untyped-def]
    """A fill function over data, as cvmbuild.source_file.fill_from is over a file."""
    position = 0

    def fill(view: memoryview) -> int:
        nonlocal position
        n = min(len(view), len(data) - position)
        view[:n] = data[position : position + n]
        position += n
        return n

    return fill


def whole(data: bytes, policy: ChunkPolicy) -> list[tuple[int, bytes]]:
    return [(c.offset, bytes(c.data)) for c in policy.cutter().cut_buf(data)]


def in_segments(data: bytes, policy: ChunkPolicy, segment: int) -> list[tuple[int, bytes]]:
    return [
        (offset, bytes(chunk))
        for seg in cut_segments(policy.cutter(), reader(data), segment)
        for offset, chunk in seg.chunks
    ]


@settings(max_examples=300, deadline=None)
@given(spec=runs, extra=st.integers(0, 3000))
def test_cutting_in_segments_gives_the_chunks_of_cutting_whole(
    spec: list[tuple[bool, int, int]], extra: int
) -> None:
    data = content_of(spec)
    segment = SMALL.max_size + extra
    assert in_segments(data, SMALL, segment) == whole(data, SMALL)


@pytest.mark.parametrize("size", [0, 1, 4 << 20, (4 << 20) + 1, 8 << 20, 29 << 20])
def test_the_publishers_segments_cut_a_release_file_as_whole_file_cutting_does(
    size: int,
) -> None:
    from cvmbuild.ingest import SEGMENT_BYTES

    data = random.Random(size).randbytes(size)
    policy = ChunkPolicy()
    assert in_segments(data, policy, SEGMENT_BYTES) == whole(data, policy)


def test_a_segment_smaller_than_the_largest_chunk_is_refused() -> None:
    with pytest.raises(ValueError):
        list(cut_segments(SMALL.cutter(), reader(b"x" * 5000), SMALL.max_size - 1))
