"""Signed text documents (manifest, whitelist) and Ed25519 keys.

Syntax: docs/FORMAT.md, "Signed documents".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvmfs_format.errors import FormatError, VerificationError
from cvmfs_format.objects import is_hash

MAX_DOCUMENT_SIZE = 64 * 1024
SIGNATURE_PREFIX = b"signature: "


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, lower-case hex."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def encode_public_key(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"not an Ed25519 public key: {text!r}") from exc


def load_public_key_pem(data: bytes, source: str) -> Ed25519PublicKey:
    """Parse the master public key file a client pins (PEM SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise FormatError(f"{source}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise FormatError(f"{source}: not an Ed25519 public key")
    return key


def split_document(data: bytes, kind: str) -> tuple[list[tuple[str, str]], bytes, bytes]:
    """Split a signed document into its fields, the signed body and the signature.

    The first line is `cvmfs-py <kind> 1`; then `key: value` lines; the last line is
    `signature: <base64>` over every byte before it.
    """
    if len(data) > MAX_DOCUMENT_SIZE:
        raise FormatError(f"{kind}: larger than {MAX_DOCUMENT_SIZE} bytes")
    if not data.endswith(b"\n"):
        raise FormatError(f"{kind}: does not end with a newline")
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1
    body, last = data[:cut], data[cut:-1]
    if not last.startswith(SIGNATURE_PREFIX):
        raise FormatError(f"{kind}: last line is not a signature")
    try:
        signature = base64.b64decode(last[len(SIGNATURE_PREFIX) :], validate=True)
        text = body.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise FormatError(f"{kind}: not valid text or base64 ({exc})") from exc
    lines = text.split("\n")[:-1]
    if not lines or lines[0] != f"cvmfs-py {kind} 1":
        raise FormatError(f"{kind}: unknown header {lines[0] if lines else ''!r}")
    fields = []
    for line in lines[1:]:
        key, sep, value = line.partition(": ")
        if not sep or not key:
            raise FormatError(f"{kind}: malformed line {line!r}")
        fields.append((key, value))
    return fields, body, signature


def join_document(kind: str, fields: list[tuple[str, str]]) -> bytes:
    """The body to be signed, in the same syntax split_document reads."""
    lines = [f"cvmfs-py {kind} 1"]
    for key, value in fields:
        if "\n" in value or "\n" in key:
            raise FormatError(f"{kind}: newline in field {key!r}")
        lines.append(f"{key}: {value}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def attach_signature(body: bytes, signature: bytes) -> bytes:
    return body + SIGNATURE_PREFIX + base64.b64encode(signature) + b"\n"


def verify_signature(key: Ed25519PublicKey, signature: bytes, body: bytes, what: str) -> None:
    try:
        key.verify(signature, body)
    except InvalidSignature as exc:
        raise VerificationError(f"{what}: bad signature") from exc


class Fields:
    """Typed access to a document's fields with errors that name the field."""

    def __init__(
        self,
        kind: str,
        pairs: list[tuple[str, str]],
        known: frozenset[str],
        repeatable: frozenset[str] = frozenset(),
    ):
        self.kind = kind
        unknown = sorted({key for key, _ in pairs} - known - repeatable)
        if unknown:
            raise FormatError(f"{kind}: unknown field {unknown[0]!r}")
        self._single: dict[str, str] = {}
        self.multi: dict[str, list[str]] = {k: [] for k in repeatable}
        for key, value in pairs:
            if key in repeatable:
                self.multi[key].append(value)
            elif key in self._single:
                raise FormatError(f"{kind}: field {key!r} appears twice")
            else:
                self._single[key] = value

    def text(self, key: str, default: str | None = None) -> str:
        value = self._single.get(key, default)
        if value is None:
            raise FormatError(f"{self.kind}: missing field {key!r}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        if key not in self._single and default is not None:
            return default
        value = self.text(key)
        if not value.isdigit() or (len(value) > 1 and value[0] == "0"):
            raise FormatError(f"{self.kind}: field {key!r} is not a number: {value!r}")
        return int(value)

    def digest(self, key: str) -> str:
        value = self.text(key)
        if not is_hash(value):
            raise FormatError(f"{self.kind}: field {key!r} is not a SHA-256 hash")
        return value


def format_time(ts: float) -> str:
    """A time stamp as every tool prints it: ISO 8601 in UTC, e.g. 2026-05-01T12:00:00Z
    (never epoch seconds or local time)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
