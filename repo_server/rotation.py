"""Signing-key rotation and whitelist renewal: which keys a new whitelist lists, and a
rotation that a crash at any step leaves resumable (docs/OPERATING.md, "Rotating the
signing key").

A rotation makes its new key as NAME.key.new first, whitelists it beside the current
key, re-signs the manifest with it, archives the old key and only then renames the new
one into place. Until that rename the rotation is half done: the whitelist keeps both
keys (a renewal too), and `key rotate` run again finishes it with the same new key.
After it, the rotation's transition lasts as long as a manifest the old key signed may
still be served (a stale mirror's, until it expires): every whitelist written meanwhile
lists the archived key too, unless the operator ends the transition (a leaked key).
"""

from __future__ import annotations

import calendar
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from repo_server.repository import (
    DAY,
    MANIFEST_DAYS,
    WHITELIST_DAYS,
    LocalRepository,
    write_whitelist,
)

# A whitelist valid longer keeps every key it lists trusted that long, whatever happens
# to the key; renewing from cron every week or month needs no more.
MAX_WHITELIST_DAYS = 90
# The longest a manifest signed just before a rotation stays valid somewhere.
TRANSITION_S = MANIFEST_DAYS * DAY


@dataclass(frozen=True)
class Rotation:
    manifest: Manifest  # re-signed with the new key
    archived: Path  # where the old signing key is kept
    resumed: bool  # finished a rotation that an earlier, interrupted run began


@dataclass(frozen=True)
class Renewal:
    whitelist: Whitelist
    unknown_signer: str | None  # the manifest's signer, if found nowhere (so not listed)
    # Archived keys still listed, each with the end of its rotation's transition.
    transition: list[tuple[Path, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Listing:
    keys: list[Ed25519PublicKey]
    unknown_signer: str | None
    transition: list[tuple[Path, int]]


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
    listing = _listing(repo, master.public_key(), [new, current], now)
    write_whitelist(repo.storage, files.name, master, listing.keys, now)
    manifest = repo.resign(new)
    archived = keys.archive_private_key(files, now)
    keys.install_pending_key(files)
    return Rotation(manifest, archived, resumed)


def check_lifetime(days: int, allow_long: bool) -> None:
    """RepoError unless a whitelist may be renewed for this many days."""
    if days < 1:
        raise RepoError(
            f"--days {days}: a whitelist must be valid for at least 1 day (renew it for 1 to "
            f"{MAX_WHITELIST_DAYS} days)"
        )
    if days > MAX_WHITELIST_DAYS and not allow_long:
        raise RepoError(
            f"--days {days}: a whitelist is renewed for 1 to {MAX_WHITELIST_DAYS} days (every "
            "key it lists stays trusted that long); give --allow-long if you mean it"
        )


def renew_whitelist(
    repo: LocalRepository,
    now: int,
    days: int = WHITELIST_DAYS,
    *,
    allow_long: bool = False,
    end_rotation: bool = False,
) -> Renewal:
    """Re-sign the whitelist with a new expiry (hold the lock). It lists the signing key,
    the new one of a rotation under way, the old keys of rotations still in their
    transition (unless end_rotation), and the key that signed the current manifest: a
    renewal never makes clients refuse the manifest they are served."""
    check_lifetime(days, allow_long)
    files = repo.key_files()
    master = keys.load_private_key(files.master)
    own = [keys.load_private_key(files.signing)]
    if files.pending.exists():
        own.insert(0, keys.load_private_key(files.pending))
    listing = _listing(repo, master.public_key(), own, None if end_rotation else now)
    written = write_whitelist(repo.storage, files.name, master, listing.keys, now, days)
    return Renewal(written, listing.unknown_signer, listing.transition)


def transition_end(archive: Path) -> int | None:
    """When the transition of the rotation that archived this key ends: TRANSITION_S
    after the UTC time in its name (NAME.key.<UTC time>[-N]); None if it has none."""
    stamp = archive.name.rsplit(".", 1)[-1].split("-", 1)[0]
    try:
        return calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ")) + TRANSITION_S
    except ValueError:
        return None


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
            f"in use); run `{command_line(repo, 'key rotate')}` to finish it"
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
            f"`{command_line(repo, 'resign')}`"
        )
    listed = _verified_listing(repo, None)
    if listed is not None and key_fingerprint(signing) not in listed:
        warnings.append(
            f"the signing key {files.signing} is not on the whitelist, so clients would "
            f"refuse the next publish; run `{command_line(repo, 'whitelist renew')}`"
        )
    return warnings


def _listing(
    repo: LocalRepository,
    master: Ed25519PublicKey,
    own: Sequence[Ed25519PrivateKey],
    now: int | None,
) -> _Listing:
    """The keys a new whitelist lists: own; the archived keys whose rotation's transition
    lasts beyond now (none if now is None); and the key that signed the current manifest
    (from the current whitelist or an archived key file), its fingerprint if found in
    neither."""
    listing = {key_fingerprint(key.public_key()): key.public_key() for key in own}
    archived: dict[str, tuple[Path, Ed25519PublicKey]] = {}
    for path in repo.key_files().archives():
        with contextlib.suppress(KeyError_):  # an unreadable archive signs nothing
            with_key = keys.load_private_key(path).public_key()
            archived[key_fingerprint(with_key)] = (path, with_key)  # the latest, sorted
    transition = []
    for fingerprint, (path, key) in archived.items():
        end = transition_end(path)
        if now is not None and end is not None and end > now and fingerprint not in listing:
            listing[fingerprint] = key
            transition.append((path, end))
    try:
        signer = repo.head_unverified().signer
    except CvmfsError:
        signer = None  # no manifest to keep verifying
    if signer is None or signer in listing:
        return _Listing(list(listing.values()), None, transition)
    known = _verified_listing(repo, master) or {}
    known.update({fingerprint: key for fingerprint, (_, key) in archived.items()})
    if signer not in known:
        return _Listing(list(listing.values()), signer, transition)
    return _Listing([*listing.values(), known[signer]], None, transition)


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


def command_line(repo: LocalRepository, verb: str) -> str:
    """The command line to run on this repository, with --keys unless it is the default."""
    command = f"repo-server {verb} {repo.location}"
    try:
        default: Path | None = keys.default_keydir(repo.root)
    except RepoError:
        default = None  # on S3: no default key directory
    return command if repo.keydir.resolve() == default else f"{command} --keys {repo.keydir}"
