"""Who may call what: agent and submitter tokens, one repo_server TokenStore file per
role in the manager's token directory (only SHA-256 digests are stored; a token is shown
once, when made). A token unknown to both is refused with 401, one of the other role
with 403.
"""

from __future__ import annotations

from pathlib import Path

from copilot_manager.errors import ApiError, ManagerError
from repo_server.tokens import Token, TokenStore

ROLES = ("agent", "submitter")
# TokenStore scopes tokens to a repository path; the manager's tokens are not scoped.
UNSCOPED = "/"


class Tokens:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.stores = {role: TokenStore(self.directory / f"{role}.json") for role in ROLES}

    def store(self, role: str) -> TokenStore:
        if role not in self.stores:
            raise ManagerError(f"role {role!r}: use one of {', '.join(ROLES)}")
        return self.stores[role]

    def add(self, role: str, name: str) -> str:
        return self.store(role).add(name, UNSCOPED)

    def count(self) -> dict[str, int]:
        return {role: len(store.tokens()) for role, store in self.stores.items()}

    def check(self, header: str | None, role: str) -> Token:
        """The token in an Authorization header, if it is one of role's; else ApiError."""
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "no token: send 'Authorization: Bearer TOKEN'")
        token = self.stores[role].authenticate(value.strip())
        if token is not None:
            return token
        for other, store in self.stores.items():
            if other != role and store.authenticate(value.strip()) is not None:
                raise ApiError(
                    403, f"this token is an {other}'s; this request needs a {role}'s token"
                )
        raise ApiError(401, "token not known to this manager (revoked, or a typo?)")
