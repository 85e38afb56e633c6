"""Property tests of the repository format: what is written reads back the same, and
damaged bytes are refused with the client's own errors, never misread."""

from __future__ import annotations

import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import paths
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.catalog import FLAG_CHUNKED, Catalog, Chunk, Entry, NestedRef, TreeStats
from cvmfs_format.catalog_writer import CatalogBuilder
from cvmfs_format.errors import CvmfsError, FormatError, VerificationError
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import (
    ZSTD_MAGIC,
    content_hash,
    decode_object,
    encode_object,
    max_stored_size,
    verify_stored,
)
from cvmfs_format.signed import attach_signature, encode_public_key, key_fingerprint
from cvmfs_format.whitelist import Whitelist
from repo_server.storage import LocalStorage

MASTER = Ed25519PrivateKey.generate()
SIGNING = Ed25519PrivateKey.generate()
SIGNER = key_fingerprint(SIGNING.public_key())
FAR_FUTURE = 2**40

# Field values are one line of UTF-8 text; a path component is any UTF-8 but '/' and NUL.
line_text = st.text(st.characters(codec="utf-8", exclude_characters="\n"))
names = st.text(
    st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=40
).filter(lambda n: n not in (".", ".."))
counts = st.integers(min_value=0, max_value=2**63 - 1)
digests = st.binary(min_size=32, max_size=32).map(bytes.hex)
public_keys = st.binary(min_size=32, max_size=32).map(
    lambda seed: encode_public_key(Ed25519PrivateKey.from_private_bytes(seed).public_key())
)


def sign(body: bytes, key: Ed25519PrivateKey) -> bytes:
    return attach_signature(body, key.sign(body))


def whitelist_for(name: str) -> Whitelist:
    return Whitelist(name, 0, FAR_FUTURE, (encode_public_key(SIGNING.public_key()),))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    published = draw(st.integers(min_value=0, max_value=FAR_FUTURE - 2))
    return Manifest(
        name=draw(line_text),
        revision=draw(counts),
        root_hash=draw(digests),
        root_size=draw(counts),
        history_hash=draw(digests),
        history_size=draw(counts),
        published=published,
        expires=draw(st.integers(min_value=published + 1, max_value=FAR_FUTURE)),
        ttl=draw(counts),
        signer=SIGNER,
    )


@st.composite
def whitelists(draw: st.DrawFn) -> Whitelist:
    created = draw(st.integers(min_value=0, max_value=FAR_FUTURE - 2))
    return Whitelist(
        name=draw(line_text),
        created=created,
        expires=draw(st.integers(min_value=created + 1, max_value=FAR_FUTURE)),
        keys=tuple(draw(st.lists(public_keys, min_size=1, max_size=4))),
    )


# -- signed documents -----------------------------------------------------------------


@given(manifests())
def test_a_signed_manifest_reads_back_the_same(manifest: Manifest) -> None:
    document = sign(manifest.body(), SIGNING)
    assert manifest_mod.parse(document)[0] == manifest
    verified = manifest_mod.verify(document, whitelist_for(manifest.name), manifest.published)
    assert verified == manifest


@given(whitelists())
def test_a_signed_whitelist_reads_back_the_same(whitelist: Whitelist) -> None:
    document = sign(whitelist.body(), MASTER)
    assert whitelist_mod.parse(document)[0] == whitelist
    assert whitelist_mod.verify(document, MASTER.public_key(), whitelist.created) == whitelist


@given(manifests(), st.data())
def test_a_damaged_manifest_never_verifies_as_something_else(
    manifest: Manifest, data: st.DataObject
) -> None:
    document = bytearray(sign(manifest.body(), SIGNING))
    position = data.draw(st.integers(0, len(document) - 1), label="position")
    document[position] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        verified = manifest_mod.verify(
            bytes(document), whitelist_for(manifest.name), manifest.published
        )
    except CvmfsError:
        return
    # Only a change that base64 ignores (spare bits of the signature's last
    # character) can survive, and then it must mean exactly the same manifest.
    assert verified == manifest


@given(whitelists(), st.data())
def test_a_damaged_whitelist_never_verifies_as_something_else(
    whitelist: Whitelist, data: st.DataObject
) -> None:
    document = bytearray(sign(whitelist.body(), MASTER))
    position = data.draw(st.integers(0, len(document) - 1), label="position")
    document[position] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        verified = whitelist_mod.verify(bytes(document), MASTER.public_key(), whitelist.created)
    except CvmfsError:
        return
    assert verified == whitelist


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_as_a_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        manifest_mod.parse(data)
    with pytest.raises(FormatError):
        whitelist_mod.parse(data)


@given(manifests())
def test_a_manifest_signed_by_the_master_key_is_refused(manifest: Manifest) -> None:
    """Only whitelisted signing keys may sign manifests; the signer field cannot lie."""
    document = sign(manifest.body(), MASTER)
    with pytest.raises(CvmfsError):
        manifest_mod.verify(document, whitelist_for(manifest.name), manifest.published)


# -- objects --------------------------------------------------------------------------

contents = st.one_of(
    st.binary(max_size=4096),
    st.binary(max_size=4096).map(lambda b: ZSTD_MAGIC + b),  # looks compressed, is not
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(0, 2000)).map(lambda t: t[0] * t[1]),
)
COMPRESSOR = zstandard.ZstdCompressor(level=3)


@given(contents)
def test_an_object_decodes_to_its_content(content: bytes) -> None:
    stored = encode_object(content, COMPRESSOR)
    digest = content_hash(content)
    assert len(stored) <= max_stored_size(len(content))
    assert decode_object(stored, digest, len(content)) == content
    assert decode_object(stored, digest) == content


@given(contents, st.data())
def test_a_damaged_object_is_refused_or_still_its_content(
    content: bytes, data: st.DataObject
) -> None:
    stored = bytearray(encode_object(content, COMPRESSOR))
    if not stored:
        return
    position = data.draw(st.integers(0, len(stored) - 1), label="position")
    stored[position] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        decoded = decode_object(bytes(stored), content_hash(content), len(content))
    except CvmfsError:
        return
    # zstd frames have bytes that do not change the output (a larger window, say);
    # whatever is accepted is the verified content itself.
    assert decoded == content


def test_a_zstd_header_claiming_terabytes_is_refused_before_allocating() -> None:
    """Found by the property above: the decompressor trusts the frame's declared size."""
    content = bytes(300)
    stored = bytearray(encode_object(content, COMPRESSOR))
    stored[4] ^= 0x90  # frame header descriptor: the size field now spans 8 bytes (~17 TB)
    for size in (len(content), None):
        with pytest.raises(VerificationError, match="declares"):
            decode_object(bytes(stored), content_hash(content), size)


@pytest.mark.parametrize("after", [b"junk", b"\x00", "a second frame"])
def test_anything_after_the_zstd_frame_makes_the_object_invalid(after: object) -> None:
    """One rule on every decoding path: what follows a frame is never silently ignored
    (zstd's one-shot decompress() would ignore it)."""
    content = b"import numpy\n" * 100
    tail = COMPRESSOR.compress(b"x") if after == "a second frame" else after
    assert isinstance(tail, bytes)
    stored = encode_object(content, COMPRESSOR) + tail
    with pytest.raises(VerificationError, match="data after its zstd frame"):
        decode_object(stored, content_hash(content), len(content))
    with pytest.raises(VerificationError, match="data after its zstd frame"):
        verify_stored(stored, content_hash(content))


def test_a_frame_cut_short_is_refused() -> None:
    content = b"import numpy\n" * 1000
    stored = encode_object(content, COMPRESSOR)
    with pytest.raises(VerificationError, match="cut short"):
        decode_object(stored[:-4], content_hash(content), len(content))


def test_a_frame_that_does_not_declare_its_size_is_decoded_in_bounded_pieces() -> None:
    """Without a declared size a frame is fed to zstd 1 KiB at a time, so a bomb is
    refused once it passes the bound, and honest content still decodes."""
    undeclared = zstandard.ZstdCompressor(level=3, write_content_size=False)
    content = bytes(range(256)) * 40_000  # 10 MB, compressible
    stored = undeclared.compress(content)
    assert zstandard.frame_content_size(stored) == -1
    assert decode_object(stored, content_hash(content), len(content)) == content
    assert verify_stored(stored, content_hash(content)) == len(content)
    bomb = undeclared.compress(bytes(1 << 30))  # 1 GiB of zeros in a few KiB
    with pytest.raises(VerificationError, match="more than the expected"):
        verify_stored(bomb, content_hash(b"tiny"))


# -- catalogs -------------------------------------------------------------------------

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
sizes = st.integers(min_value=0, max_value=2**50)  # a catalog's total must fit in int64
permissions = st.integers(min_value=0, max_value=0o7777)


@st.composite
def catalog_contents(
    draw: st.DrawFn,
) -> tuple[list[Entry], list[tuple[str, Chunk]], list[NestedRef]]:
    """A directory /sw holding files, chunked files, symlinks and directories."""
    root = "/sw"
    entries: list[Entry] = []
    chunks: list[tuple[str, Chunk]] = []
    nested: list[NestedRef] = []
    for name in draw(st.lists(names, unique=True, max_size=12)):
        path = paths.join(root, name)
        kind = draw(st.sampled_from(["file", "chunked", "symlink", "dir", "nested"]))
        mtime, link_group = draw(int64), draw(st.integers(0, 3))
        if kind == "file":
            mode, size = stat.S_IFREG | draw(permissions), draw(sizes)
            entry = Entry(path, mode, size, mtime, draw(digests), None, link_group, 0)
        elif kind == "chunked":
            pieces = draw(st.lists(st.integers(1, 2**32), min_size=1, max_size=5))
            offset = 0
            for piece in pieces:
                chunks.append((path, Chunk(offset, piece, draw(digests))))
                offset += piece
            entry = Entry(
                path, stat.S_IFREG | draw(permissions), offset, mtime, None, None, 0, FLAG_CHUNKED
            )
        elif kind == "symlink":
            target = draw(line_text.filter(bool))
            entry = Entry(
                path, stat.S_IFLNK | 0o777, len(target.encode()), mtime, None, target, 0, 0
            )
        else:
            entry = Entry(path, stat.S_IFDIR | draw(permissions), 0, mtime, None, None, 0, 0)
            if kind == "nested":
                counts_ = draw(st.tuples(*[st.integers(0, 2**40)] * 4, st.integers(1, 100)))
                size = draw(st.integers(1, 2**50))  # a catalog object is never empty
                nested.append(NestedRef(path, draw(digests), size, TreeStats(*counts_)))
        entries.append(entry)
    return entries, chunks, nested


def _row(e: Entry) -> tuple[str, str, int, int, int, str | None, str | None, int, int]:
    parent, name = paths.split(e.path)
    return (parent, name, e.mode, e.size, e.mtime_ns, e.hash, e.target, e.link_group, e.flags)


@pytest.fixture(scope="module")
def storage() -> Iterator[LocalStorage]:
    """One object store for every example: objects are content-addressed, never clash."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStorage(Path(tmp))
        store.create_layout()
        yield store


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(catalog_contents())
def test_a_catalog_reads_back_its_entries(
    storage: LocalStorage,
    contents: tuple[list[Entry], list[tuple[str, Chunk]], list[NestedRef]],
) -> None:
    entries, chunks, nested = contents
    builder = CatalogBuilder("/sw")
    builder.add_entries([_row(e) for e in entries])
    builder.add_chunks([(path, c.offset, c.size, c.hash) for path, c in chunks])
    for ref in nested:
        builder.add_nested(ref)
    stored = builder.finish(storage, COMPRESSOR)

    data = decode_object(storage.get_object(stored.hash), stored.hash)
    catalog = Catalog.from_bytes(data, stored.hash)
    assert catalog.root == "/sw"
    assert catalog.all_entries() == sorted(entries, key=lambda e: e.name)
    for entry in entries:
        assert catalog.entry(entry.path) == entry
        assert catalog.chunks(entry.path) == [c for p, c in chunks if p == entry.path]
    assert catalog.children("/sw") == catalog.all_entries()
    assert catalog.nested == {ref.path: ref for ref in nested}

    files = [e for e in entries if e.is_file]
    own = TreeStats(
        len(files),
        sum(e.is_dir for e in entries),
        sum(e.is_symlink for e in entries),
        sum(e.size for e in files),
        1,
    )
    assert catalog.stats() == sum((ref.stats for ref in nested), own) == stored.stats
    for entry in entries:
        if entry.link_group:
            assert catalog.link_count(entry.link_group) == sum(
                e.link_group == entry.link_group for e in entries
            )
    catalog.close()


# -- paths ----------------------------------------------------------------------------


@given(st.lists(names, max_size=6), st.booleans(), st.booleans())
def test_a_path_normalises_to_one_canonical_form(
    parts: list[str], leading: bool, trailing: bool
) -> None:
    text = ("/" if leading else "") + "//".join(parts) + ("/" if trailing else "")
    canonical = paths.normalize(text)
    assert canonical == "/" + "/".join(parts)
    assert paths.normalize(canonical) == canonical
    if parts:
        assert paths.join(*paths.split(canonical)) == canonical


@given(
    st.lists(names, max_size=4),
    st.sampled_from([".", ".."]),
    st.lists(names, max_size=4),
)
def test_dot_and_dotdot_are_refused_not_resolved(
    before: list[str], dots: str, after: list[str]
) -> None:
    with pytest.raises(FormatError):
        paths.normalize("/".join(["", *before, dots, *after]))


@given(st.text(max_size=30), st.text(max_size=30))
def test_a_nul_byte_is_refused_anywhere(before: str, after: str) -> None:
    with pytest.raises(FormatError):
        paths.normalize(before + "\0" + after)
