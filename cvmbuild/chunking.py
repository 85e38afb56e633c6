"""Content-defined chunks of a file read in bounded segments, cut exactly as if the whole
file had been cut at once (docs/FORMAT.md, 8 "Publishing and revision rules").

FastCDC decides a cut from the bytes between the chunk's start and at most max_size
after it, so a cut found before the end of a segment is final; the piece after the last
such cut may end early only because the segment did, and is carried into the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyfastcdc import FastCDC


@dataclass(frozen=True)
class ChunkPolicy:
    threshold: int = 4 * 1024 * 1024  # files larger than this are chunked
    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024

    def cutter(self) -> FastCDC:
        # Imported here: it costs 10 ms (typing_extensions), and only large files need it.
        from pyfastcdc import FastCDC

        return FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size)


@dataclass(frozen=True)
class Segment:
    """One segment's final chunks: (offset in the file, bytes) views into `buffer`, which
    nothing writes to once it is handed out."""

    buffer: bytearray
    chunks: list[tuple[int, memoryview]]


Fill = Callable[[memoryview], int]  # fills the view from the file; fewer bytes only at EOF


def cut_segments(cdc: FastCDC, fill: Fill, segment_size: int) -> Iterator[Segment]:
    """The chunks of what fill reads, segment by segment: the same chunks as
    cdc.cut_buf over the whole content. Each segment is a new buffer that begins with the
    bytes carried over from the previous one."""
    if segment_size < cdc.max_size:
        raise ValueError(f"segment size {segment_size} below the largest chunk {cdc.max_size}")
    carry = memoryview(b"")
    base = 0  # file offset of the buffer's first byte
    while True:
        buffer = bytearray(len(carry) + segment_size)
        buffer[: len(carry)] = carry
        view = memoryview(buffer)
        got = fill(view[len(carry) :])
        at_end = got < segment_size
        content = view[: len(carry) + got]
        cuts = [(base + c.offset, c.data) for c in cdc.cut_buf(content)]
        if not at_end and cuts:
            carry_offset, carry = cuts.pop()
            base = carry_offset
        if cuts:
            yield Segment(buffer, cuts)
        if at_end:
            return
