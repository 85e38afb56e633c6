"""Ed25519 key files of a repository: the master key, the signing key, the pinned public key.

They live in KEYDIR (default DIR.keys), never inside the served directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cvmfs_format.durable import write_atomic
from cvmfs_format.signed import load_public_key_pem
from repo_server.errors import KeyError_


@dataclass(frozen=True)
class KeyFiles:
    keydir: Path
    name: str

    @property
    def master(self) -> Path:
        return self.keydir / f"{self.name}.masterkey"

    @property
    def signing(self) -> Path:
        return self.keydir / f"{self.name}.key"

    @property
    def public(self) -> Path:
        """The master public key that clients pin."""
        return self.keydir / f"{self.name}.pub"


def default_keydir(repo_dir: Path) -> Path:
    return repo_dir.parent / f"{repo_dir.name}.keys"


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a new key file; never overwrites one."""
    if not write_atomic(path, _private_pem(key), mode=0o600, replace=False):
        raise KeyError_(f"{path}: already exists; refusing to overwrite a key")


def archive_private_key(path: Path, now: int) -> Path:
    """Keep the key at path also as path.<UTC time>, before it is replaced; returns that."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    archived = path.with_name(f"{path.name}.{stamp}")
    try:
        os.link(path, archived)
    except FileExistsError as exc:
        raise KeyError_(f"{archived}: already exists; wait a second and try again") from exc
    except FileNotFoundError as exc:
        raise KeyError_(f"{path}: key file not found (use --keys KEYDIR)") from exc
    return archived


def install_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Replace the key at path atomically, so path always holds a whole key."""
    write_atomic(path, _private_pem(key), mode=0o600)


def write_public_key(path: Path, key: Ed25519PrivateKey) -> None:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomic(path, public)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyError_(f"{path}: key file not found (use --keys KEYDIR)") from exc
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read key file ({exc.strerror})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise KeyError_(f"{path}: not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path):  # type: ignore[no-untyped-def]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read public key ({exc.strerror})") from exc
    return load_public_key_pem(data, str(path))
