"""What the client keeps to trust a repository: the pinned master key and name, and the
revision floor each repository has reached, kept on disk across runs so that no command
(mount, cat, ls, preload) ever accepts an older revision than one it has seen
(docs/FORMAT.md, "Verification")."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvmfs_client.errors import ClientError
from cvmfs_format import whitelist
from cvmfs_format.durable import write_atomic
from cvmfs_format.errors import CvmfsError, FormatError, VerificationError
from cvmfs_format.signed import (
    MAX_DOCUMENT_SIZE,
    key_fingerprint,
    load_public_key_pem,
    verify_signature,
)
from cvmfs_format.trust import PUBLIC_KEY_SUFFIX, Floor, TrustedState, pinned_name

if TYPE_CHECKING:  # fetcher loads pycurl
    from cvmfs_client.fetcher import Fetcher

STATE_DIR_ENV = "CVMFS_CLIENT_STATE_DIR"


def default_state_dir() -> str:
    """Where the floors live: shared by every command of one user (root: the system's)."""
    configured = os.environ.get(STATE_DIR_ENV)
    if configured:
        return configured
    if os.geteuid() == 0:
        return "/var/lib/cvmfs-client/state"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "cvmfs-client")


class FloorFile:
    """The floor of one repository (by name and master key) in a state directory."""

    def __init__(self, directory: str, name: str, key_id: str, legacy: str | None = None):
        """legacy: a `revision-<key>` file an earlier client kept in its cache directory."""
        self.directory = directory
        self.path = os.path.join(directory, f"floor-{name}-{key_id[:16]}")
        self.legacy = legacy

    def load(self) -> Floor:
        floor = self._read(self.path)
        if self.legacy is not None:
            floor = floor.later(self._read(self.legacy))
        return floor

    def _read(self, path: str) -> Floor:
        try:
            with open(path) as f:
                return Floor.decode(f.read(200), path)
        except FileNotFoundError:
            return Floor()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"{path}: cannot read the remembered revision ({exc})") from exc
        except FormatError as exc:
            raise ClientError(str(exc)) from exc

    def store(self, floor: Floor) -> None:
        """Remember floor unless a later one is remembered already (another command of
        the same user may have gone further meanwhile)."""
        with self._locked():
            current = self._read(self.path)
            if current.revision > floor.revision or (
                current.revision == floor.revision and current.root_hash
            ):
                return
            write_atomic(self.path, floor.encode().encode())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def open_trust(
    key_file: str, name: str | None, state_dir: str, legacy_dir: str | None = None
) -> tuple[TrustedState, FloorFile]:
    """The trust state for the repository that key_file and name (default: the key file's
    NAME.pub) pin, starting at its remembered floor; store the floor back after use."""
    key = load_key(key_file)
    repository = pinned_name(key_file, name)
    key_id = key_fingerprint(key)
    legacy = os.path.join(legacy_dir, f"revision-{key_id[:16]}") if legacy_dir else None
    floors = FloorFile(state_dir, repository, key_id, legacy)
    return TrustedState(key, repository, floors.load()), floors


def load_key(key_file: str) -> Ed25519PublicKey:
    try:
        with open(key_file, "rb") as f:
            return load_public_key_pem(f.read(), key_file)
    except OSError as exc:
        raise ClientError(f"{key_file}: cannot read public key ({exc.strerror})") from exc


def choose_key(candidates: Sequence[str], name: str, fetcher: Fetcher) -> str:
    """The master key of repository `name` among a site's key files (CVMFS_PUBLIC_KEY,
    CVMFS_KEYS_DIR): the only one, else the one that signs the whitelist the repository
    serves, as CernVM-FS tries each of its keys; with no source answering, the one named
    NAME.pub (so that a warm cache mounts offline). Whether the whitelist is for `name`
    the trust state checks afterwards."""
    if len(candidates) == 1:
        return candidates[0]
    keys = [(path, load_key(path)) for path in candidates]
    answered = False

    def signer(data: bytes) -> str:
        nonlocal answered
        answered = True
        _, body, signature = whitelist.parse(data)
        for path, key in keys:
            with contextlib.suppress(VerificationError):
                verify_signature(key, signature, body, "whitelist")
                return path
        raise VerificationError(f"whitelist: signed by none of the {len(keys)} keys")

    try:
        return fetcher.fetch(whitelist.WHITELIST_FILE, MAX_DOCUMENT_SIZE, signer)
    except CvmfsError as exc:
        named = [p for p in candidates if os.path.basename(p) == name + PUBLIC_KEY_SUFFIX]
        if named and not answered:
            return named[0]
        raise ClientError(
            f"{name}: cannot tell which of {', '.join(candidates)} is its key ({exc}); "
            "set CVMFS_PUBLIC_KEY to the one"
        ) from exc
