"""The operator's side of `repo-server serve`: the publish leases listed and dropped by
`repo-server leases` (docs/OPERATING.md, "Publish leases").

Leases live in the memory of the serving process, so the command asks it. When it
starts, the server records where it listens and a secret in KEYDIR/serving.json (mode
0600): whoever may read the key directory is the operator.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cvmfs_format.durable import write_atomic
from cvmfs_format.pack import API
from cvmfs_format.signed import format_time
from repo_server.access_log import set_user
from repo_server.api_errors import ApiError, guarded
from repo_server.errors import RepoError
from repo_server.leases import Leases, LeaseView
from repo_server.tokens import check_path

SERVING_FILE = "serving.json"
OPERATOR_API = f"{API}/operator"
SECRET_PREFIX = "cvmo_"
TIMEOUT_S = 30


@dataclass(frozen=True)
class Serving:
    """A running `repo-server serve`, as it recorded itself."""

    pid: int
    host: str  # the host name it runs on
    url: str  # where this host reaches it
    secret: str


def local_url(host: str, port: int) -> str:
    """Where a command on this host reaches a server listening on host:port."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def registered(keydir: Path, host: str, port: int) -> Iterator[str]:
    """Record this server in keydir for the block; yields the operator's secret. A key
    directory it may not write only costs the operator `repo-server leases`."""
    serving = Serving(
        os.getpid(),
        socket.gethostname(),
        local_url(host, port),
        SECRET_PREFIX + secrets.token_urlsafe(32),
    )
    path = keydir / SERVING_FILE
    try:
        if keydir.is_dir():  # else no token can publish (a mirror): no lease to list
            write_atomic(path, json.dumps(asdict(serving)).encode(), mode=0o600)
    except OSError as exc:
        print(
            f"warning: cannot write {path} ({exc.strerror}): `repo-server leases` will not "
            "find this server",
            file=sys.stderr,
        )
    try:
        yield serving.secret
    finally:
        if _read(path) == serving:  # not replaced by a server started since
            path.unlink(missing_ok=True)


def _read(path: Path) -> Serving | None:
    try:
        return Serving(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise RepoError(f"{path}: unreadable ({exc}); remove it and restart the server") from exc


def lease_json(view: LeaseView) -> dict[str, object]:
    return {
        "id": view.id,
        "path": view.path,
        "token": view.token,
        "publisher": view.publisher,
        "since": format_time(view.since),
        "expires": format_time(view.expires),
        "committing": view.committing,
    }


def routes(leases: Leases, secret: str) -> list[Route]:
    def operator(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), secret):
            raise ApiError(401, f"the operator's API needs the secret in {SERVING_FILE}")
        set_user(request, "operator")

    async def listing(request: Request) -> Response:
        operator(request)
        return JSONResponse({"leases": [lease_json(view) for view in leases.listing()]})

    async def drop(request: Request) -> Response:
        operator(request)
        try:
            key = str((await request.json())["lease"])
            if key.startswith("/"):
                key = check_path(key)
        except (ValueError, KeyError, TypeError, RepoError) as exc:
            raise ApiError(400, f'give {{"lease": ID or PATH}} ({exc})') from exc
        return JSONResponse({"dropped": lease_json(leases.drop(key))})

    return [
        Route(f"{OPERATOR_API}/leases", guarded(listing, "listing leases"), methods=["GET"]),
        Route(f"{OPERATOR_API}/leases/drop", guarded(drop, "dropping a lease"), methods=["POST"]),
    ]


class OperatorClient:
    """`repo-server leases`: asks the server recorded in a key directory."""

    def __init__(self, keydir: Path):
        self.path = keydir / SERVING_FILE
        self.serving = _read(self.path)
        if self.serving is not None and _gone(self.serving):
            self.serving = None  # killed without cleaning up: no leases survive it

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import requests

        serving = self.serving
        assert serving is not None
        try:
            response = requests.request(
                method,
                f"{serving.url}{OPERATOR_API}{path}",
                headers={"Authorization": f"Bearer {serving.secret}"},
                timeout=TIMEOUT_S,
                **kwargs,
            )
        except requests.RequestException as exc:
            raise RepoError(
                f"{serving.url}: the server that {self.path} names (pid {serving.pid} on "
                f"{serving.host}) does not answer ({exc.__class__.__name__}); is it running?"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 300:
            raise RepoError(body.get("error") or f"{serving.url}: HTTP {response.status_code}")
        return dict(body)


def _gone(serving: Serving) -> bool:
    """Whether the recorded server is known to be dead (only if it ran on this host)."""
    if serving.host != socket.gethostname():
        return False
    try:
        os.kill(serving.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
