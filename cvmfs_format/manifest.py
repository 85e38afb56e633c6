"""The manifest: the one mutable, signed file naming a repository's current revision."""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_format import signed
from cvmfs_format.errors import VerificationError
from cvmfs_format.whitelist import Whitelist

KIND = "manifest"
MANIFEST_FILE = "manifest"  # its path in a repository (docs/FORMAT.md, "Layout")
DEFAULT_TTL = 240
FIELDS = frozenset(
    {
        "name",
        "revision",
        "root",
        "root-size",
        "history",
        "history-size",
        "published",
        "expires",
        "ttl",
        "signer",
    }
)


@dataclass(frozen=True)
class Manifest:
    name: str
    revision: int
    root_hash: str
    root_size: int  # stored bytes of the root catalog object
    history_hash: str
    history_size: int
    published: int
    expires: int
    ttl: int
    signer: str  # fingerprint of the signing key

    def body(self) -> bytes:
        return signed.join_document(
            KIND,
            [
                ("name", self.name),
                ("revision", str(self.revision)),
                ("root", self.root_hash),
                ("root-size", str(self.root_size)),
                ("history", self.history_hash),
                ("history-size", str(self.history_size)),
                ("published", str(self.published)),
                ("expires", str(self.expires)),
                ("ttl", str(self.ttl)),
                ("signer", self.signer),
            ],
        )


def parse(data: bytes) -> tuple[Manifest, bytes, bytes]:
    """Parse without verifying: returns the manifest, its signed body and signature."""
    pairs, body, signature = signed.split_document(data, KIND)
    fields = signed.Fields(KIND, pairs, FIELDS)
    manifest = Manifest(
        name=fields.text("name"),
        revision=fields.integer("revision"),
        root_hash=fields.digest("root"),
        root_size=fields.integer("root-size"),
        history_hash=fields.digest("history"),
        history_size=fields.integer("history-size"),
        published=fields.integer("published"),
        expires=fields.integer("expires"),
        ttl=fields.integer("ttl"),
        signer=fields.digest("signer"),
    )
    return manifest, body, signature


def verify(data: bytes, whitelist: Whitelist, now: float) -> Manifest:
    """Parse and check the signature, the repository name and the expiry. The revision
    floor is a reader's: cvmfs_format.trust.TrustedState applies it."""
    manifest, body, signature = parse(data)
    key = whitelist.signing_key(manifest.signer)
    signed.verify_signature(key, signature, body, "manifest")
    if manifest.name != whitelist.name:
        raise VerificationError(
            f"manifest is for repository {manifest.name!r}, whitelist for {whitelist.name!r}"
        )
    if now >= manifest.expires:
        raise VerificationError(
            f"manifest of {manifest.name!r} revision {manifest.revision} expired at "
            f"{signed.format_time(manifest.expires)} (the operator must publish or run "
            "`repo-server resign`)"
        )
    return manifest
