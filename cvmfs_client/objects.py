"""Object naming, compression and hash verification (docs/FORMAT.md, "Objects")."""

from __future__ import annotations

import hashlib
import re

import zstandard

from cvmfs_client.errors import FormatError, VerificationError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HASH_RE = re.compile(r"[0-9a-f]{64}")


def content_hash(data: bytes | memoryview) -> str:
    """The name of an object: SHA-256 of its uncompressed content, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def is_hash(value: str) -> bool:
    return _HASH_RE.fullmatch(value) is not None


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


def decode_object(stored: bytes, digest: str, content_size: int | None = None) -> bytes:
    """Turn an object's stored bytes into its verified content.

    Raises VerificationError unless the content hashes to `digest` (and has
    `content_size` bytes, when known): the caller never sees unverified bytes.
    """
    if stored[:4] == ZSTD_MAGIC:
        limit = content_size if content_size is not None else max_catalog_content(len(stored))
        try:
            # decompress() allocates what the frame header declares, ignoring
            # max_output_size: a forged header must not make us allocate terabytes.
            declared = zstandard.frame_content_size(stored)
            if declared > limit:
                raise VerificationError(
                    f"object {digest}: declares {declared} bytes of content, expected {limit}"
                )
            content = zstandard.ZstdDecompressor().decompress(stored, max_output_size=max(limit, 1))
        except zstandard.ZstdError as exc:
            raise VerificationError(f"object {digest}: corrupt zstd data ({exc})") from exc
    else:
        content = stored
    if content_size is not None and len(content) != content_size:
        raise VerificationError(
            f"object {digest}: expected {content_size} bytes, got {len(content)}"
        )
    actual = content_hash(content)
    if actual != digest:
        raise VerificationError(
            f"object {digest}: content hashes to {actual}; the copy is corrupt or tampered "
            "with (try another mirror, or tell the repository's operator)"
        )
    return content


def encode_object(content: bytes | memoryview, compressor: zstandard.ZstdCompressor) -> bytes:
    """Stored form of content: zstd unless that is not smaller (docs/FORMAT.md, "Objects").

    Content that begins with the zstd magic is always compressed, so a reader can tell
    the two forms apart by the first four bytes.
    """
    compressed = compressor.compress(content)
    if len(compressed) < len(content) or bytes(content[:4]) == ZSTD_MAGIC:
        return compressed
    return bytes(content)
