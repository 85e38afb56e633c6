"""Object naming, compression and hash verification (docs/FORMAT.md, "Objects")."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zstandard

from cvmfs_format.errors import FormatError, VerificationError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Deleting the 16 digits leaves nothing of a hash: twice as fast as a regex, and every
# catalog row a reader loads asks.
_NOT_HEX = str.maketrans("", "", "0123456789abcdef")


def content_hash(data: bytes | memoryview) -> str:
    """The name of an object: SHA-256 of its uncompressed content, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def is_hash(value: str) -> bool:
    """64 lower-case hexadecimal digits."""
    return len(value) == 64 and not value.translate(_NOT_HEX)


def object_path(digest: str) -> str:
    """Path of an object relative to the repository root."""
    if not is_hash(digest):
        raise FormatError(f"not an object name: {digest!r}")
    return f"data/{digest[:2]}/{digest[2:]}"


def max_stored_size(content_size: int) -> int:
    """Upper bound of an object's stored size, given its content size.

    Content is stored raw unless compression makes it smaller, except content that
    itself starts with the zstd magic, which is always compressed; zstd's worst case
    is bounded by its compressBound.
    """
    return content_size + (content_size >> 8) + 128


def max_catalog_content(stored_size: int) -> int:
    """Bound on the content of an object whose content size is not recorded (catalogs,
    history): 256 times its stored size, at least 16 MiB, at most 4 GiB."""
    return min(max(stored_size * 256, 16 << 20), 4 << 30)


PIECE = 1 << 20  # content is decompressed and hashed this much at a time
# The largest zstd window a frame may use (docs/FORMAT.md, "Objects"): what levels 1-19
# use. A decoder holds a window's worth of content; zstd's own default allows 128 MiB.
MAX_WINDOW = 8 << 20
HEADER_BYTES = 18  # the most a zstd frame header takes, magic included


def _content_pieces(
    stored: bytes | memoryview, digest: str, limit: int, *, whole: bool = False
) -> Iterator[bytes]:
    """The content of an object's stored bytes, a piece at a time, never more than limit
    bytes in all: a frame that declares or decompresses to more is refused before its
    excess is produced (the decompression-bomb defence). With whole, a frame that
    declares its size (up to 64 pieces) comes in one piece, for callers that keep it."""
    if bytes(stored[:4]) != ZSTD_MAGIC:
        if len(stored) > limit:
            raise VerificationError(f"object {digest}: {len(stored)} bytes, expected {limit}")
        yield bytes(stored)
        return
    try:
        # decompress() would allocate what a frame header declares: stream instead.
        declared = zstandard.frame_content_size(stored)
        if declared > limit:
            raise VerificationError(
                f"object {digest}: declares {declared} bytes of content, expected {limit}"
            )
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        reader = decompressor.stream_reader(stored, read_across_frames=False)
        size = max(PIECE, declared + 1) if whole and 0 <= declared <= PIECE * 64 else PIECE
        total = 0
        while piece := reader.read(size):
            total += len(piece)
            if total > limit:
                raise VerificationError(
                    f"object {digest}: decompresses to more than the expected {limit} bytes"
                )
            yield piece
    except zstandard.ZstdError as exc:
        raise VerificationError(f"object {digest}: corrupt zstd data ({exc})") from exc


def _mismatch(digest: str, actual: str) -> VerificationError:
    return VerificationError(
        f"object {digest}: content hashes to {actual}; the copy is corrupt or tampered "
        "with (try another mirror, or tell the repository's operator)"
    )


def decode_object(
    stored: bytes | memoryview, digest: str, content_size: int | None = None
) -> bytes:
    """Turn an object's stored bytes into its verified content.

    Raises VerificationError unless the content hashes to `digest` (and has
    `content_size` bytes, when known): the caller never sees unverified bytes.
    """
    limit = content_size if content_size is not None else max_catalog_content(len(stored))
    pieces = list(_content_pieces(stored, digest, limit, whole=True))
    content = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if content_size is not None and len(content) != content_size:
        raise VerificationError(
            f"object {digest}: expected {content_size} bytes, got {len(content)}"
        )
    actual = content_hash(content)
    if actual != digest:
        raise _mismatch(digest, actual)
    return content


def verify_stored(
    stored: bytes | memoryview,
    digest: str,
    content_limit: int | None = None,
    sink: Callable[[bytes], object] | None = None,
) -> int:
    """Check that stored bytes are the object `digest` without holding its content (what
    a storage does before it writes one, and the gateway with an upload); returns the
    content size. content_limit defaults to the bound for an unknown size. sink, if
    given, gets the content piece by piece: unverified until this returns."""
    limit = max_catalog_content(len(stored)) if content_limit is None else content_limit
    hasher = hashlib.sha256()
    size = 0
    for piece in _content_pieces(stored, digest, limit):
        hasher.update(piece)
        size += len(piece)
        if sink is not None:
            sink(piece)
    if hasher.hexdigest() != digest:
        raise _mismatch(digest, hasher.hexdigest())
    return size


def declared_content_size(head: bytes | memoryview, stored_size: int) -> int | None:
    """An object's content size as its first HEADER_BYTES stored bytes declare it: a raw
    object's is its stored size, a zstd frame's is in its header if the writer put it
    there (None if not). Trust it only for an object that was verified when stored:
    decoding then checked the header against the content."""
    if bytes(head[:4]) != ZSTD_MAGIC:
        return stored_size
    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise VerificationError(f"corrupt zstd frame header ({exc})") from exc
    return declared if declared >= 0 else None


@dataclass(frozen=True)
class ObjectRef:
    """An object as the verified chain names it: its hash and what its size must be.

    Catalogs and the history are named with their exact stored size (manifest,
    nested rows, history rows); files and chunks with their content size.
    """

    digest: str
    size: int
    exact_stored: bool = False

    @classmethod
    def catalog(cls, digest: str, stored_size: int) -> ObjectRef:
        """A catalog or the history: named by hash and exact stored size."""
        return cls(digest, stored_size, exact_stored=True)

    @property
    def path(self) -> str:
        return object_path(self.digest)

    @property
    def max_stored(self) -> int:
        """The most bytes a download of it may bring (the endless-data defence)."""
        return self.size if self.exact_stored else max_stored_size(self.size)

    def decode(self, stored: bytes | memoryview) -> bytes:
        """The verified content of these stored bytes, or VerificationError."""
        if self.exact_stored and len(stored) != self.size:
            raise VerificationError(
                f"object {self.digest}: stored size {len(stored)}, expected {self.size}"
            )
        if not self.exact_stored and len(stored) > self.max_stored:
            raise VerificationError(
                f"object {self.digest}: stored size {len(stored)} too large for "
                f"{self.size} bytes of content"
            )
        return decode_object(stored, self.digest, None if self.exact_stored else self.size)

    def verify(self, stored: bytes | memoryview) -> None:
        """As decode, without keeping the content."""
        if self.exact_stored:
            self.decode(stored)
            return
        if len(stored) > self.max_stored:
            raise VerificationError(
                f"object {self.digest}: stored size {len(stored)} too large for "
                f"{self.size} bytes of content"
            )
        size = verify_stored(stored, self.digest, self.size)
        if size != self.size:
            raise VerificationError(f"object {self.digest}: expected {self.size} bytes, got {size}")


def encode_object(content: bytes | memoryview, compressor: zstandard.ZstdCompressor) -> bytes:
    """Stored form of content: zstd unless that is not smaller (docs/FORMAT.md, "Objects").

    Content that begins with the zstd magic is always compressed, so a reader can tell
    the two forms apart by the first four bytes.
    """
    compressed = compressor.compress(content)
    if len(compressed) < len(content) or bytes(content[:4]) == ZSTD_MAGIC:
        return compressed
    return bytes(content)
