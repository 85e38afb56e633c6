"""Signing-key rotation and whitelist renewal: which keys a new whitelist lists, and a
rotation that a crash at any step leaves resumable (docs/OPERATING.md, "Rotating the
signing key").

A rotation makes its new key as NAME.key.new first, whitelists it beside the current
key, re-signs the manifest with it, archives the old key and only then renames the new
one into place. Until that rename the rotation is half done: the whitelist keeps both
keys (a renewal too), and `key rotate` run again finishes it with the same new key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cvmfs_format import signed
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.errors import CvmfsError
from cvmfs_format.manifest import Manifest
from cvmfs_format.signed import key_fingerprint
from cvmfs_format.whitelist import WHITELIST_FILE, Whitelist
from repo_server import keys
from repo_server.errors import KeyError_, RepoError
from repo_server.repository import WHITELIST_DAYS, LocalRepository, write_whitelist


@dataclass(frozen=True)
class Rotation:
    manifest: Manifest  # re-signed with the new key
    archived: Path  # where the old signing key is kept
    resumed: bool  # finished a rotation that an earlier, interrupted run began


@dataclass(frozen=True)
class Renewal:
    whitelist: Whitelist
    unknown_signer: str | None  # the manifest's signer, if found nowhere (so not listed)


def rotate_signing_key(repo: LocalRepository, now: int) -> Rotation:
    """Replace the signing key and re-sign the head with the new one (hold the lock);
    finishes a rotation an earlier run began, if any."""
    files = repo.key_files()
    master = keys.load_private_key(files.master)
    current = keys.load_private_key(files.signing)
    keys.remove_dead_writers_files(files.keydir)
    resumed = files.pending.exists()
    if resumed:
        new = keys.load_private_key(files.pending)
    else:
        new = Ed25519PrivateKey.generate()
        keys.write_private_key(files.pending, new)
    # Both keys stay listed: a manifest the old key signed, in a proxy or a mirror not
    # yet updated, still verifies.
    listing, _ = _listing(repo, master.public_key(), [new, current])
    write_whitelist(repo.storage, files.name, master, listing, now)
    manifest = repo.resign(new)
    archived = keys.archive_private_key(files, now)
    keys.install_pending_key(files)
    return Rotation(manifest, archived, resumed)


def renew_whitelist(repo: LocalRepository, now: int, days: int = WHITELIST_DAYS) -> Renewal:
    """Re-sign the whitelist with a new expiry (hold the lock). It lists the signing key,
    the new one of a rotation under way, and the key that signed the current manifest:
    a renewal never makes clients refuse the manifest they are served."""
    files = repo.key_files()
    master = keys.load_private_key(files.master)
    own = [keys.load_private_key(files.signing)]
    if files.pending.exists():
        own.insert(0, keys.load_private_key(files.pending))
    listing, unknown = _listing(repo, master.public_key(), own)
    return Renewal(write_whitelist(repo.storage, files.name, master, listing, now, days), unknown)


def rotation_warnings(repo: LocalRepository, head: Manifest) -> list[str]:
    """What `check` says of a half-done rotation, or of a signing key that a publish
    could not use: the repository reads fine today, but the operator has to act."""
    try:
        files = repo.key_files()
    except CvmfsError:
        return []  # no readable whitelist names the key files: check reports that
    if files.pending.exists():
        return [
            f"a key rotation is half done ({files.pending} is the new signing key, not yet "
            f"in use); run `{_command(repo, 'key rotate')}` to finish it"
        ]
    try:
        signing = keys.load_private_key(files.signing).public_key()
    except KeyError_:
        return []  # a mirror's key directory holds only the public key
    warnings = []
    if head.signer != key_fingerprint(signing):
        warnings.append(
            f"the manifest is signed by key {head.signer[:16]}..., not by the signing key "
            f"{files.signing} (a key rotation stopped before re-signing?); run "
            f"`{_command(repo, 'resign')}`"
        )
    listed = _verified_listing(repo, None)
    if listed is not None and key_fingerprint(signing) not in listed:
        warnings.append(
            f"the signing key {files.signing} is not on the whitelist, so clients would "
            f"refuse the next publish; run `{_command(repo, 'whitelist renew')}`"
        )
    return warnings


def _listing(
    repo: LocalRepository, master: Ed25519PublicKey, own: Sequence[Ed25519PrivateKey]
) -> tuple[list[Ed25519PublicKey], str | None]:
    """The keys a new whitelist lists: own, and the key that signed the current manifest
    (from the current whitelist or an archived key file); its fingerprint if found in
    neither."""
    listing = [key.public_key() for key in own]
    try:
        signer = repo.head_unverified().signer
    except CvmfsError:
        return listing, None  # no manifest to keep verifying
    if signer in {key_fingerprint(key) for key in listing}:
        return listing, None
    known = _verified_listing(repo, master) or {}
    for path in repo.key_files().archives():
        with contextlib.suppress(KeyError_):  # an unreadable archive cannot be the signer
            with_key = keys.load_private_key(path).public_key()
            known.setdefault(key_fingerprint(with_key), with_key)
    if signer not in known:
        return listing, signer
    return [*listing, known[signer]], None


def _verified_listing(
    repo: LocalRepository, master: Ed25519PublicKey | None
) -> dict[str, Ed25519PublicKey] | None:
    """The current whitelist's keys by fingerprint, if its signature holds (an expired
    one too: renewing it is the point); None if it is missing or forged."""
    data = repo.storage.read_file(WHITELIST_FILE)
    try:
        if master is None:
            master = keys.load_public_key(repo.key_files().public)
        whitelist, body, signature = whitelist_mod.parse(data or b"")
        signed.verify_signature(master, signature, body, "whitelist")
    except CvmfsError:
        return None
    found = (signed.decode_public_key(text) for text in whitelist.keys)
    return {key_fingerprint(key): key for key in found}


def _command(repo: LocalRepository, verb: str) -> str:
    """The command line to run on this repository, with --keys unless it is the default."""
    command = f"repo-server {verb} {repo.location}"
    try:
        default: Path | None = keys.default_keydir(repo.root)
    except RepoError:
        default = None  # on S3: no default key directory
    return command if repo.keydir.resolve() == default else f"{command} --keys {repo.keydir}"
