"""Publish tokens: who may publish under which path (`repo-server token`, the gateway).

Only a SHA-256 of each token is stored, in a JSON file beside the keys (never in the
served directory); the token itself is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cvmfs_format import paths
from cvmfs_format.durable import write_atomic
from cvmfs_format.errors import FormatError
from repo_server.errors import RepoError

TOKEN_PREFIX = "cvmt_"
TOKENS_FILE = "tokens.json"


@dataclass(frozen=True)
class Token:
    name: str
    path: str  # may publish at this path and below
    sha256: str
    created: int

    def allows(self, path: str) -> bool:
        return paths.is_within(path, self.path)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_.@" for c in name):
        raise RepoError(f"token name {name!r}: use up to 64 letters, digits and '-_.@'")


def check_path(path: str) -> str:
    """The normalised absolute repository path, or RepoError saying what is wrong."""
    if not path.startswith("/"):
        raise RepoError(f"path {path!r}: must be absolute, e.g. /sw/myexp")
    try:
        return paths.normalize(path)
    except FormatError as exc:
        raise RepoError(str(exc)) from exc


class TokenStore:
    """The token file; re-read when it changes, so a revoke takes effect at once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._tokens: list[Token] = []

    def _load(self) -> list[Token]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._tokens = None, []
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                raw = json.loads(self.path.read_text())
                self._tokens = [Token(**item) for item in raw["tokens"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise RepoError(f"{self.path}: not a token file ({exc}); fix or remove it") from exc
            self._stamp = stamp
        return self._tokens

    def _save(self, tokens: list[Token]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps({"tokens": [asdict(t) for t in tokens]}, indent=1)
        write_atomic(self.path, text.encode(), mode=0o600)

    def tokens(self) -> list[Token]:
        return list(self._load())

    def add(self, name: str, path: str) -> str:
        """Make a token for name, allowed to publish at path and below; returns it."""
        check_name(name)
        path = check_path(path)
        tokens = self._load()
        if any(t.name == name for t in tokens):
            raise RepoError(f"token {name!r} exists; revoke it first or choose another name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._save([*tokens, Token(name, path, _digest(token), int(time.time()))])
        return token

    def revoke(self, name: str) -> None:
        tokens = self._load()
        kept = [t for t in tokens if t.name != name]
        if len(kept) == len(tokens):
            raise RepoError(f"no token named {name!r} (see `repo-server token list`)")
        self._save(kept)

    def authenticate(self, token: str) -> Token | None:
        digest = _digest(token)
        found = None
        for candidate in self._load():  # compare with every one: no timing hint
            if hmac.compare_digest(candidate.sha256, digest):
                found = candidate
        return found
