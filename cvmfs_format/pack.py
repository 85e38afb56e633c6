"""The publish API's wire formats, shared by the gateway and `cvmbuild publish` over HTTP.

A pack carries many objects in one request body: a magic line, then per object its
32-byte SHA-256 (the object's name), a 4-byte big-endian length and its stored bytes
(docs/PUBLISHING.md, "The publish API").
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from cvmfs_format.errors import FormatError

API = "/api/v1"
PACK_MAGIC = b"cvmfs-py pack 1\n"
PACK_LIMIT = 32 << 20  # bytes of one upload request
OBJECT_LIMIT = 64 << 20  # stored bytes of one object (chunks and files are far smaller)
MISSING_LIMIT = 10000  # digests per "which do you lack" question
_HEADER = struct.Struct(">32sI")


def encode_pack(objects: Iterable[tuple[str, bytes]]) -> bytes:
    parts = [PACK_MAGIC]
    for digest, stored in objects:
        parts.append(_HEADER.pack(bytes.fromhex(digest), len(stored)))
        parts.append(stored)
    return b"".join(parts)


def pack_overhead() -> int:
    return _HEADER.size


def iter_pack(data: bytes | bytearray) -> Iterator[tuple[str, memoryview]]:
    """(digest, stored bytes) of each object in a pack, as views into it (no copies);
    FormatError if it is malformed. Names are not verified here: the gateway decodes
    every object against its name."""
    if not data.startswith(PACK_MAGIC):
        raise FormatError("upload is not a pack (bad magic)")
    view = memoryview(data)
    offset = len(PACK_MAGIC)
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            raise FormatError(f"pack truncated at byte {offset}")
        raw, length = _HEADER.unpack_from(view, offset)
        offset += _HEADER.size
        if length > OBJECT_LIMIT or offset + length > len(data):
            raise FormatError(f"pack object at byte {offset} claims {length} bytes")
        yield raw.hex(), view[offset : offset + length]
        offset += length
