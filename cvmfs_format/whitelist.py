"""The whitelist: signing keys allowed to sign manifests, signed by the master key."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvmfs_format import signed
from cvmfs_format.errors import FormatError, VerificationError

KIND = "whitelist"
WHITELIST_FILE = "whitelist"  # its path in a repository (docs/FORMAT.md, "Layout")


@dataclass(frozen=True)
class Whitelist:
    name: str
    created: int
    expires: int
    keys: tuple[str, ...]  # base64 raw Ed25519 public keys

    def body(self) -> bytes:
        fields = [
            ("name", self.name),
            ("created", str(self.created)),
            ("expires", str(self.expires)),
        ]
        fields += [("key", key) for key in self.keys]
        return signed.join_document(KIND, fields)

    def signing_key(self, fingerprint: str) -> Ed25519PublicKey:
        for text in self.keys:
            key = signed.decode_public_key(text)
            if signed.key_fingerprint(key) == fingerprint:
                return key
        raise VerificationError(
            f"manifest signed by key {fingerprint[:16]}..., which is not on the whitelist"
        )


def parse(data: bytes) -> tuple[Whitelist, bytes, bytes]:
    """Parse without verifying: returns the whitelist, its signed body and signature."""
    pairs, body, signature = signed.split_document(data, KIND)
    fields = signed.Fields(
        KIND, pairs, frozenset({"name", "created", "expires"}), frozenset({"key"})
    )
    whitelist = Whitelist(
        name=fields.text("name"),
        created=fields.integer("created"),
        expires=fields.integer("expires"),
        keys=tuple(fields.multi["key"]),
    )
    if not whitelist.keys:
        raise FormatError("whitelist: lists no signing key")
    for key in whitelist.keys:
        signed.decode_public_key(key)
    return whitelist, body, signature


def verify(data: bytes, master_key: Ed25519PublicKey, now: float) -> Whitelist:
    """Parse and check the master key's signature and the expiry."""
    whitelist, body, signature = parse(data)
    try:
        signed.verify_signature(master_key, signature, body, "whitelist")
    except VerificationError as exc:
        # Far more often a wrong key than a forged whitelist: say which to check first.
        raise VerificationError(
            f"{exc}: this key is not the repository's master key (give the {whitelist.name}.pub "
            "that `repo-server init` wrote), or the whitelist was altered"
        ) from exc
    if now >= whitelist.expires:
        raise VerificationError(
            f"whitelist of {whitelist.name!r} expired at {signed.format_time(whitelist.expires)} "
            "(the operator must run `repo-server whitelist renew`)"
        )
    return whitelist
