"""Whatever an attacker, a broken disk or a stale mirror does to a repository, readers
refuse it with a clear error and `repo-server check` reports it."""

from __future__ import annotations

import base64
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.errors import CvmfsError, FormatError, NotFoundError, VerificationError
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import object_path
from cvmfs_format.signed import SIGNATURE_PREFIX, attach_signature, key_fingerprint
from cvmfs_format.trust import Floor
from repo_server.keys import KeyFiles, load_private_key
from tests.conftest import Repo, open_reader, publish, read_back, run_cli

DAY = 86400
MiB = 1024 * 1024


@pytest.fixture
def published(tmp_path: Path, repo: Repo) -> Repo:
    """A repository at revision 1 holding text, incompressible and chunked files."""
    src = tmp_path / "release"
    src.mkdir()
    rng = random.Random(3)
    (src / "README").write_text("how to run the analysis\n" * 50)
    (src / "random.bin").write_bytes(rng.randbytes(64 * 1024))  # stored raw
    (src / "other.bin").write_bytes(rng.randbytes(64 * 1024))
    (src / "big.bin").write_bytes(rng.randbytes(5 * MiB))  # chunked
    publish(src, repo, "/sw")
    return repo


def keys_of(repo: Repo) -> KeyFiles:
    return KeyFiles(repo.keys, repo.name)


def object_file(repo: Repo, digest: str) -> Path:
    return repo.dir / object_path(digest)


def file_hash(repo: Repo, path: str) -> str:
    entry = open_reader(repo).lookup(path)
    assert entry.hash is not None
    return entry.hash


def flip_byte(path: Path, position: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if position is None else position
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def assert_refused(
    repo: Repo,
    path: str,
    error: type[CvmfsError],
    *,
    says: str = "",
    check_says: str = "",
    **reader_args: object,
) -> bytes:
    """The library, `cvmfs-client cat` and `repo-server check` all refuse the repository.

    Returns what `cat` wrote before it stopped: only bytes that passed verification.
    """
    with pytest.raises(error, match=says):
        read_back(open_reader(repo, **reader_args), path)

    cat = run_cli("cvmfs-client", "cat", repo.dir, path, "--key", repo.pub, check=False)
    stderr = cat.stderr.decode()
    assert cat.returncode == 1
    assert stderr.startswith("error: ") and says in stderr
    assert len(stderr.splitlines()) == 1, "one line, no traceback"

    report = run_cli("repo-server", "check", repo.dir, check=False)
    out = report.stdout.decode()
    assert report.returncode == 1, out
    assert "check FAILED" in out and check_says in out
    return cat.stdout


def assert_healthy(repo: Repo, path: str) -> None:
    assert read_back(open_reader(repo), path)
    run_cli("repo-server", "check", repo.dir)


def sign_manifest(repo: Repo, manifest: Manifest, key: Ed25519PrivateKey) -> None:
    body = manifest.body()
    (repo.dir / "manifest").write_bytes(attach_signature(body, key.sign(body)))


def current_manifest(repo: Repo) -> Manifest:
    return manifest_mod.parse((repo.dir / "manifest").read_bytes())[0]


# -- objects --------------------------------------------------------------------------


def test_a_flipped_byte_in_a_file_object_is_refused(published: Repo) -> None:
    digest = file_hash(published, "/sw/README")
    flip_byte(object_file(published, digest))
    assert_refused(published, "/sw/README", VerificationError, says=digest, check_says=digest)


def test_a_flipped_byte_in_a_chunk_is_refused(published: Repo) -> None:
    reader = open_reader(published)
    chunks = reader.catalog_for_dir("/sw").chunks("/sw/big.bin")
    assert len(chunks) > 1
    genuine = read_back(reader, "/sw/big.bin")
    digest = chunks[1].hash
    flip_byte(object_file(published, digest))
    written = assert_refused(
        published, "/sw/big.bin", VerificationError, says=digest, check_says=digest
    )
    # cat streams chunk by chunk: it stops at the bad one, after only verified bytes.
    assert written == genuine[: chunks[1].offset]


@pytest.mark.parametrize("which", ["root", "nested"])
def test_a_flipped_byte_in_a_catalog_is_refused(published: Repo, which: str) -> None:
    reader = open_reader(published)
    catalog = reader.root_catalog() if which == "root" else reader.catalog_for_dir("/sw")
    flip_byte(object_file(published, catalog.digest))
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says=catalog.digest,
        check_says=f"catalog {catalog.digest}",
    )


def test_a_truncated_object_is_refused(published: Repo) -> None:
    digest = file_hash(published, "/sw/random.bin")
    obj = object_file(published, digest)
    obj.write_bytes(obj.read_bytes()[: obj.stat().st_size // 2])
    assert_refused(published, "/sw/random.bin", VerificationError, says=digest, check_says=digest)


def test_an_object_swapped_for_another_valid_object_is_refused(published: Repo) -> None:
    wanted, other = file_hash(published, "/sw/random.bin"), file_hash(published, "/sw/other.bin")
    shutil.copyfile(object_file(published, other), object_file(published, wanted))
    assert_refused(
        published,
        "/sw/random.bin",
        VerificationError,
        says=f"hashes to {other}",
        check_says=f"{wanted}: content hashes to {other}",
    )


def test_a_missing_object_is_reported(published: Repo) -> None:
    digest = file_hash(published, "/sw/README")
    object_file(published, digest).unlink()
    assert_refused(
        published, "/sw/README", NotFoundError, says=digest[2:], check_says=f"{digest}: missing"
    )


# -- manifest and whitelist -----------------------------------------------------------


def test_a_raised_revision_number_breaks_the_manifest_signature(published: Repo) -> None:
    manifest = published.dir / "manifest"
    data = manifest.read_bytes()
    assert b"revision: 1\n" in data
    manifest.write_bytes(data.replace(b"revision: 1\n", b"revision: 9\n"))
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="manifest: bad signature",
        check_says="manifest or whitelist",
    )


def test_a_flipped_byte_in_the_manifest_signature_is_refused(published: Repo) -> None:
    manifest = published.dir / "manifest"
    data = manifest.read_bytes()
    body_end = data.index(SIGNATURE_PREFIX)
    signature = bytearray(base64.b64decode(data[body_end + len(SIGNATURE_PREFIX) : -1]))
    signature[10] ^= 0x01
    manifest.write_bytes(attach_signature(data[:body_end], bytes(signature)))
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="manifest: bad signature",
        check_says="manifest or whitelist",
    )


def test_a_truncated_manifest_is_refused(published: Repo) -> None:
    manifest = published.dir / "manifest"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    with pytest.raises(FormatError, match="manifest"):
        open_reader(published)
    cat = run_cli(
        "cvmfs-client", "cat", published.dir, "/sw/README", "--key", published.pub, check=False
    )
    assert cat.returncode == 1 and cat.stderr.startswith(b"error: manifest")
    report = run_cli("repo-server", "check", published.dir, check=False)
    assert report.returncode == 1
    assert b"manifest: does not end with a newline" in report.stdout
    assert b"check FAILED" in report.stdout


def test_a_flipped_byte_in_the_whitelist_is_refused(published: Repo) -> None:
    whitelist = published.dir / "whitelist"
    data = whitelist.read_bytes()
    # Move the expiry by a second; the last digit XOR 1 stays a digit, so the document
    # still parses and only the signature can tell.
    flip_byte(whitelist, data.index(b"\n", data.index(b"expires: ")) - 1)
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="whitelist: bad signature",
        check_says="manifest or whitelist",
    )


def test_a_manifest_signed_by_a_key_not_on_the_whitelist_is_refused(published: Repo) -> None:
    rogue = Ed25519PrivateKey.generate()
    forged = replace(current_manifest(published), signer=key_fingerprint(rogue.public_key()))
    sign_manifest(published, forged, rogue)
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="not on the whitelist",
        check_says="not on the whitelist",
    )


def test_a_manifest_with_a_borrowed_signer_name_is_refused(published: Repo) -> None:
    """A rogue key claiming to be the whitelisted signer fails the signature check."""
    sign_manifest(published, current_manifest(published), Ed25519PrivateKey.generate())
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="bad signature",
        check_says="manifest or whitelist",
    )


def test_an_expired_whitelist_is_refused_until_renewed(published: Repo) -> None:
    # A client whose clock is past the whitelist's 30 days.
    with pytest.raises(VerificationError, match="whitelist .* expired"):
        open_reader(published, clock=lambda: time.time() + 31 * DAY)

    # The same repository, its whitelist re-signed by the real master key but expired.
    old = whitelist_mod.parse((published.dir / "whitelist").read_bytes())[0]
    now = int(time.time())
    expired = replace(old, created=now - 40 * DAY, expires=now - 10 * DAY)
    master = load_private_key(keys_of(published).master)
    body = expired.body()
    (published.dir / "whitelist").write_bytes(attach_signature(body, master.sign(body)))
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="whitelist renew",
        check_says="expired",
    )

    run_cli("repo-server", "whitelist", "renew", published.dir)
    assert_healthy(published, "/sw/README")


def test_an_expired_manifest_is_refused_until_resigned(published: Repo) -> None:
    # A client 31 days ahead: the whitelist (renewed for 90 days) holds, the manifest not.
    run_cli("repo-server", "whitelist", "renew", published.dir, "--days", "90")
    with pytest.raises(VerificationError, match="manifest .* expired"):
        open_reader(published, clock=lambda: time.time() + 31 * DAY)

    now = int(time.time())
    head = current_manifest(published)
    expired = replace(head, published=now - 40 * DAY, expires=now - DAY)
    sign_manifest(published, expired, load_private_key(keys_of(published).signing))
    assert_refused(
        published,
        "/sw/README",
        VerificationError,
        says="repo-server resign",
        check_says="expired",
    )

    run_cli("repo-server", "resign", published.dir)
    assert_healthy(published, "/sw/README")
    assert current_manifest(published).revision == head.revision


# -- replay ---------------------------------------------------------------------------


def publish_revision_2(repo: Repo, tmp_path: Path) -> bytes:
    """Publish a second release; return revision 1's genuine manifest."""
    old_manifest = (repo.dir / "manifest").read_bytes()
    src = tmp_path / "release-2"
    src.mkdir()
    (src / "README").write_text("release 2\n")
    publish(src, repo, "/sw", "--replace")  # a release replacing the one before
    return old_manifest


def test_an_older_manifest_than_already_seen_is_refused(published: Repo, tmp_path: Path) -> None:
    """A stale mirror or an attacker replays revision 1 to a client that has seen 2."""
    (published.dir / "manifest").write_bytes(publish_revision_2(published, tmp_path))
    with pytest.raises(VerificationError, match="refusing to go back"):
        open_reader(published, Floor(2))
    # Without a memory of revision 2 it is a genuine, if old, revision.
    assert open_reader(published, Floor(1)).manifest == current_manifest(published)


def test_a_reader_never_goes_back_to_a_revision_older_than_it_has_seen(
    published: Repo, tmp_path: Path
) -> None:
    old_manifest = publish_revision_2(published, tmp_path)
    reader = open_reader(published)
    assert reader.manifest is not None and reader.manifest.revision == 2

    (published.dir / "manifest").write_bytes(old_manifest)
    with pytest.raises(VerificationError, match="refusing to go back"):
        reader.load_manifest()
    assert read_back(reader, "/sw/README") == b"release 2\n"
