"""Leases of the publish API: who publishes where, what each lease uploaded, and its one
commit (docs/PUBLISHING.md). Leases live in the memory of the one serving process.

A lease ends with its commit, whatever the outcome, so the path is free at once for
the next publish; a commit asked again on the same lease (two at once, or a retry after
a lost answer) gets the first one's outcome instead of making a second revision. The
operator may list the leases and drop one (`repo-server leases`, operator_api.py).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cvmfs_format import paths
from repo_server.api_errors import ApiError
from repo_server.tokens import Token

LEASE_TTL_S = 120  # a lease not renewed for this long is given up (its publisher died)


@dataclass(frozen=True)
class Outcome:
    """A finished commit's answer: status and JSON body."""

    status: int
    body: dict[str, object]


class CommitOnce:
    """The one commit of a lease: the first request runs it, the others wait for it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._outcome: Outcome | None = None

    def finish(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._done.set()

    def wait(self) -> Outcome:
        self._done.wait()
        assert self._outcome is not None
        return self._outcome

    @property
    def running(self) -> bool:
        return not self._done.is_set()


@dataclass
class Lease:
    id: str
    path: str
    token: str  # name of the token that holds it
    expires: float
    publisher: str | None = None  # the publisher's own name for its request
    since: float = field(default_factory=time.time)  # granted (Unix time)
    # A dry run's lease keeps its uploads here, in memory, instead of storing them.
    held: dict[str, bytes] | None = None
    # Content size of every object uploaded on this lease (the gateway verified them).
    sizes: dict[str, int] = field(default_factory=dict)
    commit: CommitOnce | None = None


@dataclass(frozen=True)
class LeaseView:
    """A lease as the operator sees it (`repo-server leases`)."""

    id: str
    path: str
    token: str
    publisher: str | None
    since: float  # Unix times
    expires: float
    committing: bool


class Leases:
    """Who is publishing where. Overlapping prefixes exclude each other."""

    def __init__(self, ttl: float = LEASE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._ended: dict[str, tuple[Lease, float]] = {}  # committed: kept for retries
        self._dropped: dict[str, float] = {}  # by the operator: id -> until when it is said
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = self.clock()
        for lease_id, lease in list(self._leases.items()):
            committing = lease.commit is not None and lease.commit.running
            if lease.expires < now and not committing:
                del self._leases[lease_id]
        for lease_id in [k for k, (_, until) in self._ended.items() if until < now]:
            del self._ended[lease_id]
        for lease_id in [k for k, until in self._dropped.items() if until < now]:
            del self._dropped[lease_id]

    def acquire(
        self, token: Token, path: str, publisher: str | None = None, dry_run: bool = False
    ) -> Lease:
        """A new lease on path; or, asked again by the same publisher (its answer was
        lost on the way), the one it holds, which would otherwise block it."""
        with self._lock:
            self._expire()
            asked = (token.name, path, publisher)
            for other in self._leases.values():
                if publisher and (other.token, other.path, other.publisher) == asked:
                    if other.commit is None:
                        other.expires = self.clock() + self.ttl
                        return other
                if paths.is_within(path, other.path) or paths.is_within(other.path, path):
                    raise ApiError(
                        409, f"{other.path} is being published by {other.token!r}; waiting"
                    )
            lease = Lease(
                secrets.token_hex(16), path, token.name, self.clock() + self.ttl, publisher
            )
            if dry_run:
                lease.held = {}
            self._leases[lease.id] = lease
            return lease

    def _held(self, lease_id: str, token: Token) -> Lease:
        """The live lease lease_id of token (hold the lock)."""
        self._expire()
        lease = self._leases.get(lease_id)
        if lease is None:
            if lease_id in self._ended:
                raise ApiError(410, "this lease has committed; start a new publish")
            if lease_id in self._dropped:
                raise ApiError(
                    410, "the repository's operator dropped this lease; start the publish again"
                )
            raise ApiError(410, "lease unknown or expired; start the publish again")
        if lease.token != token.name:
            raise ApiError(403, "this lease belongs to another token")
        return lease

    def use(self, lease_id: str, token: Token) -> Lease:
        with self._lock:
            lease = self._held(lease_id, token)
            lease.expires = self.clock() + self.ttl
            return lease

    def check(self, lease_id: str, token: Token) -> None:
        """ApiError unless lease_id is token's, live or ended by a commit."""
        with self._lock:
            ended = self._ended.get(lease_id)
            if ended is None or ended[0].token != token.name:
                self._held(lease_id, token)

    def start_commit(self, lease_id: str, token: Token) -> tuple[Lease, CommitOnce, bool]:
        """The lease, its commit, and whether this caller runs it (the first does; any
        other waits for the first's outcome, even once the lease has ended)."""
        with self._lock:
            ended = self._ended.get(lease_id)
            if ended is not None and ended[0].token == token.name and ended[0].commit:
                return ended[0], ended[0].commit, False
            lease = self._held(lease_id, token)
            if lease.commit is not None:
                return lease, lease.commit, False
            lease.commit = CommitOnce()
            return lease, lease.commit, True

    def finish_commit(self, lease: Lease, outcome: Outcome) -> None:
        """Record the outcome and end the lease: its path is free for the next publish."""
        assert lease.commit is not None
        with self._lock:
            self._leases.pop(lease.id, None)
            lease.sizes = {}
            lease.held = None if lease.held is None else {}
            self._ended[lease.id] = (lease, self.clock() + self.ttl)
        lease.commit.finish(outcome)

    def release(self, lease_id: str) -> None:
        """Give a lease up (its publisher stopped); a commit in progress keeps it."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None and not (lease.commit is not None and lease.commit.running):
                del self._leases[lease_id]

    def listing(self) -> list[LeaseView]:
        """The live leases, oldest first."""
        with self._lock:
            self._expire()
            now, wall = self.clock(), time.time()
            return [
                LeaseView(
                    lease.id,
                    lease.path,
                    lease.token,
                    lease.publisher,
                    lease.since,
                    wall + lease.expires - now,
                    lease.commit is not None and lease.commit.running,
                )
                for lease in sorted(self._leases.values(), key=lambda lease: lease.since)
            ]

    def drop(self, key: str) -> LeaseView:
        """End the live lease whose id is key (or starts with it) or whose path is key, as
        the operator: its publisher is told so, and the path is free. A commit in
        progress is not stopped."""
        with self._lock:
            self._expire()
            found = [lease for lease in self._leases.values() if key in (lease.id, lease.path)]
            if not found and len(key) >= 4:
                found = [lease for lease in self._leases.values() if lease.id.startswith(key)]
            if not found:
                raise ApiError(
                    404, f"no lease on or with id {key!r} (`repo-server leases` lists them)"
                )
            if len(found) > 1:
                raise ApiError(
                    409, f"{key!r} is the beginning of {len(found)} lease ids; give more"
                )
            lease = found[0]
            if lease.commit is not None and lease.commit.running:
                raise ApiError(409, f"the lease on {lease.path} is committing; it ends with that")
            del self._leases[lease.id]
            self._dropped[lease.id] = self.clock() + self.ttl
        return LeaseView(
            lease.id, lease.path, lease.token, lease.publisher, lease.since, time.time(), False
        )
