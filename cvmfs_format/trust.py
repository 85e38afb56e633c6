"""The trust rules of docs/FORMAT.md, "Verification", in one pure class: bytes in, the
accepted whitelist and manifest out, no I/O (after python-tuf's TrustedMetadataSet).

Every reader uses it: the client's mount, `cvmfs-client cat`/`ls`/`preload`, `repo-server
replicate`, `check` and the server's own head. What a reader persists (the revision
floor) it reads back and hands in; what it fetches it hands in as bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvmfs_format import manifest as manifest_mod
from cvmfs_format import whitelist as whitelist_mod
from cvmfs_format.errors import FormatError, VerificationError
from cvmfs_format.manifest import Manifest
from cvmfs_format.objects import ObjectRef, is_hash
from cvmfs_format.whitelist import Whitelist

PUBLIC_KEY_SUFFIX = ".pub"  # `repo-server init` writes the master public key as NAME.pub


@dataclass(frozen=True)
class Floor:
    """The newest revision a reader has accepted for a repository. It never accepts an
    older one, nor another root catalog under the same revision number (a fork, or a
    forged manifest signed with a stolen key)."""

    revision: int = 0
    root_hash: str = ""  # "" when only the number is known

    def encode(self) -> str:
        return f"{self.revision} {self.root_hash}".rstrip() + "\n"

    @classmethod
    def decode(cls, text: str, source: str) -> Floor:
        parts = text.split()
        if (
            not 1 <= len(parts) <= 2
            or not parts[0].isdigit()
            or (len(parts) == 2 and not is_hash(parts[1]))
        ):
            raise FormatError(
                f"{source}: not a remembered revision; remove it to trust the server again"
            )
        return cls(int(parts[0]), parts[1] if len(parts) == 2 else "")

    def later(self, other: Floor) -> Floor:
        """The higher of two floors (the one to keep when two readers remember)."""
        return other if other.revision > self.revision else self


def pinned_name(key_file: str, name: str | None) -> str:
    """The repository name a reader pins: the one given, else the name of the key file
    `NAME.pub` (as `repo-server init` writes it); FormatError if neither says."""
    if name:
        return name
    base = os.path.basename(key_file)
    if base.endswith(PUBLIC_KEY_SUFFIX) and len(base) > len(PUBLIC_KEY_SUFFIX):
        return base[: -len(PUBLIC_KEY_SUFFIX)]
    raise FormatError(
        f"{key_file}: cannot tell which repository this key is for; give the repository's "
        f"name with --name (or name the key file NAME{PUBLIC_KEY_SUFFIX})"
    )


class TrustedState:
    """The whitelist and manifest a reader has accepted for one repository, pinned by its
    master public key and its name, never older than its floor."""

    def __init__(self, master_key: Ed25519PublicKey, name: str, floor: Floor = Floor()):
        self.master_key = master_key
        self.name = name
        self.floor = floor
        self.whitelist: Whitelist | None = None
        self.manifest: Manifest | None = None

    def update_whitelist(self, data: bytes, now: float) -> Whitelist:
        """Accept a whitelist: the master key's signature, the pinned name, the expiry."""
        whitelist = whitelist_mod.verify(data, self.master_key, now)
        if whitelist.name != self.name:
            raise VerificationError(
                f"the source serves repository {whitelist.name!r}, not {self.name!r}: "
                "check the URL (or --name, if the repository was renamed)"
            )
        self.whitelist = whitelist
        return whitelist

    def update_manifest(self, data: bytes, now: float) -> Manifest:
        """Accept a manifest signed by a whitelisted key, for the pinned name, unexpired,
        not older than the floor; it becomes the floor. Needs update_whitelist first."""
        if self.whitelist is None:
            raise VerificationError("a manifest can only be verified after its whitelist")
        manifest = manifest_mod.verify(data, self.whitelist, now)
        self.check_floor(manifest)
        self.manifest = manifest
        self.floor = Floor(manifest.revision, manifest.root_hash)
        return manifest

    def check_floor(self, manifest: Manifest) -> None:
        floor = self.floor
        if manifest.revision < floor.revision:
            raise VerificationError(
                f"manifest revision {manifest.revision} is older than revision "
                f"{floor.revision} already seen: refusing to go back (replayed or stale mirror)"
            )
        if (
            manifest.revision == floor.revision
            and floor.root_hash
            and manifest.root_hash != floor.root_hash
        ):
            raise VerificationError(
                f"manifest revision {manifest.revision} names another root catalog than the "
                f"revision {floor.revision} already seen: refusing a forked or forged "
                "repository (tell its operator)"
            )

    def check_fresh(self, now: float) -> None:
        """A reader that keeps using what it accepted (a mount) asks this on every use:
        an expired whitelist or manifest must not be served (docs/FORMAT.md, 4)."""
        if self.whitelist is not None and now >= self.whitelist.expires:
            raise VerificationError(
                f"the whitelist of {self.name!r} expired and no renewed one could be loaded "
                "(the operator must run `repo-server whitelist renew`)"
            )
        if self.manifest is not None and now >= self.manifest.expires:
            raise VerificationError(
                f"the manifest of {self.name!r} revision {self.manifest.revision} expired and "
                "no newer one could be loaded (the operator must publish or run "
                "`repo-server resign`)"
            )

    def root(self) -> ObjectRef:
        return ObjectRef.catalog(self._manifest().root_hash, self._manifest().root_size)

    def history(self) -> ObjectRef:
        return ObjectRef.catalog(self._manifest().history_hash, self._manifest().history_size)

    def _manifest(self) -> Manifest:
        if self.manifest is None:
            raise VerificationError("no manifest accepted yet")
        return self.manifest
