"""`repo-server serve`: the repository's static files over HTTP on an ASGI stack.

Reads are GET and HEAD of static files; the publish API (repo_server/gateway.py) sits
under /api/v1. Range and ETag come from Starlette's FileResponse, which
does not answer conditional requests itself, so revalidation (304) is done here. Objects
are immutable and cached for a year; the manifest and whitelist for a short time.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.staticfiles import NotModifiedResponse

from cvmfs_format.manifest import MANIFEST_FILE
from cvmfs_format.objects import is_hash
from cvmfs_format.whitelist import WHITELIST_FILE
from repo_server.errors import RepoError
from repo_server.gateway import Gateway
from repo_server.http_caching import IMMUTABLE, SIGNED_DOCUMENT_MAX_AGE_S


def cache_control(relpath: str, ttl: int) -> str | None:
    if relpath in (MANIFEST_FILE, WHITELIST_FILE):
        return f"public, max-age={min(ttl, SIGNED_DOCUMENT_MAX_AGE_S)}"
    parts = relpath.split("/")
    if len(parts) == 3 and parts[0] == "data" and is_hash(parts[1] + parts[2]):
        return IMMUTABLE
    return None  # anything else (lock, txn) is not part of the served repository


def not_modified(request: Request, response: Response) -> bool:
    """A conditional GET/HEAD the cache can answer from its copy (RFC 9110, 13.1.2-3)."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
        return "*" in tags or response.headers["etag"] in tags
    since = request.headers.get("if-modified-since")
    if since is None:
        return False
    try:
        return parsedate_to_datetime(since) >= parsedate_to_datetime(
            response.headers["last-modified"]
        )
    except (TypeError, ValueError):
        return False


def create_app(root: Path, ttl: int = 60, gateway: Gateway | None = None) -> Starlette:
    """The read side (static files) and, given a gateway, the publish API."""
    root = root.resolve()

    async def serve_file(request: Request) -> Response:
        relpath = request.path_params["path"]
        policy = cache_control(relpath, ttl)
        if policy is None:
            return PlainTextResponse("not found\n", status_code=404)
        full = os.path.join(root, relpath)
        try:
            st = os.stat(full)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            return PlainTextResponse("not found\n", status_code=404)
        response = FileResponse(
            full,
            headers={"Cache-Control": policy},
            media_type="application/octet-stream",
            stat_result=st,
        )
        if not_modified(request, response):
            return NotModifiedResponse(response.headers)
        return response

    async def index(request: Request) -> Response:
        return PlainTextResponse(f"cvmfs-py repository {root.name}\n")

    return Starlette(
        routes=[
            *(gateway.routes() if gateway is not None else []),
            Route("/", index, methods=["GET", "HEAD"]),
            Route("/{path:path}", serve_file, methods=["GET", "HEAD"]),
        ]
    )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket. A port in use is a one-line error, said before anything
    announces "serving"."""
    try:
        return socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=2048,
        )
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RepoError(
            f"--listen {host}:{port}: cannot listen there ({why}); stop what uses the port "
            "or choose another"
        ) from exc


def serve(
    root: Path,
    host: str,
    port: int,
    gateway: Gateway | None = None,
    announce: Callable[[], None] = lambda: None,
) -> None:
    """Serve until stopped; announce() once the port is bound. Everything slow to set
    up comes first, so the port does not accept connections that nobody answers."""
    import uvicorn

    # One process: leases live in its memory (docs/PUBLISHING.md).
    app = create_app(root, gateway=gateway)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    listener = bind(host, port)
    announce()
    server.run(sockets=[listener])
