"""Ed25519 key files of a repository: the master key, the signing key, the pinned public
key, and during a key rotation the new signing key and the archived old ones.

They live in KEYDIR (default DIR.keys), never inside the served directory.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cvmfs_format.durable import TMP_PREFIX, sync_directory, write_atomic, writer_is_gone
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

    @property
    def pending(self) -> Path:
        """The next signing key while a rotation is under way (it becomes `signing`)."""
        return self.keydir / f"{self.name}.key.new"

    def archives(self) -> list[Path]:
        """Old signing keys that rotations kept (NAME.key.<UTC time>)."""
        return sorted(p for p in self.keydir.glob(f"{self.name}.key.*") if p != self.pending)


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


def archive_private_key(files: KeyFiles, now: int) -> Path:
    """Keep the signing key also as NAME.key.<UTC time>, before it is replaced; returns
    that, or the archive an interrupted rotation already made of the same key."""
    path = files.signing
    try:
        current = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyError_(f"{path}: key file not found (use --keys KEYDIR)") from exc
    for archived in files.archives():
        if archived.read_bytes() == current:
            return archived
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    for suffix in itertools.chain([""], (f"-{n}" for n in itertools.count(2))):
        archived = path.with_name(f"{path.name}.{stamp}{suffix}")
        try:
            os.link(path, archived)
        except FileExistsError:
            continue  # another rotation in the same second
        sync_directory(files.keydir)
        return archived
    raise AssertionError("unreachable")


def install_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Replace the key at path atomically, so path always holds a whole key."""
    write_atomic(path, _private_pem(key), mode=0o600)


def install_pending_key(files: KeyFiles) -> None:
    """Make the pending key the signing key, in one rename: the rotation's last step."""
    os.rename(files.pending, files.signing)
    sync_directory(files.keydir)


def remove_dead_writers_files(keydir: Path) -> int:
    """Remove key files in progress that a killed process of this host left behind (they
    may hold private keys); returns how many."""
    removed = 0
    for path in keydir.glob(f"{TMP_PREFIX}*"):
        if writer_is_gone(path.name):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
