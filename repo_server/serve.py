"""`repo-server serve`: the repository's static files over HTTP on an ASGI stack.

Reads are GET and HEAD of static files; the publish API (repo_server/gateway.py) sits
under /api/v1, the operator's (operator_api.py) under /api/v1/operator, /health and
/metrics beside them (monitoring.py); every request goes to the access log
(access_log.py). Range and ETag come from Starlette's FileResponse, which
does not answer conditional requests itself, so revalidation (304) is done here. Objects
are immutable and cached for a year; the manifest and whitelist for a short time.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import FrameType

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.staticfiles import NotModifiedResponse

from cvmfs_format.manifest import MANIFEST_FILE
from cvmfs_format.objects import is_hash
from cvmfs_format.whitelist import WHITELIST_FILE
from repo_server import monitoring, operator_api
from repo_server.access_log import ACCESS_LOGGER, AccessLog, open_logs
from repo_server.errors import RepoError
from repo_server.gateway import Gateway
from repo_server.http_caching import IMMUTABLE, SIGNED_DOCUMENT_MAX_AGE_S
from repo_server.metrics import Metrics


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


def create_app(
    root: Path,
    ttl: int = 60,
    gateway: Gateway | None = None,
    operator_secret: str | None = None,
) -> Starlette:
    """The read side (static files) and, given a gateway, the publish API, /health and
    /metrics, and given the operator's secret, the operator's API."""
    root = root.resolve()
    api = []
    if gateway is not None:
        api += gateway.routes() + monitoring.routes(gateway.repo, gateway.metrics, gateway.leases)
        if operator_secret is not None:
            api += operator_api.routes(gateway.leases, operator_secret)

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

    metrics = gateway.metrics if gateway is not None else Metrics()
    logger = logging.getLogger(ACCESS_LOGGER)
    return Starlette(
        routes=[
            *api,
            Route("/", index, methods=["GET", "HEAD"]),
            Route("/{path:path}", serve_file, methods=["GET", "HEAD"]),
        ],
        middleware=[Middleware(AccessLog, logger=logger, metrics=metrics)],
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
    gateway: Gateway,
    access_log: str | None = None,
    announce: Callable[[], None] = lambda: None,
) -> None:
    """Serve until stopped: the access log to access_log (default: stderr), errors with
    their tracebacks to stderr; recorded for `repo-server leases` meanwhile. announce()
    once the port is bound; everything slow to set up comes first, so the port does not
    accept connections that nobody answers."""
    import uvicorn

    open_logs(access_log)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit 0 then, as
    # systemd expects, through the finally blocks (operator_api.registered's).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    # One process: leases live in its memory (docs/PUBLISHING.md).
    with operator_api.registered(gateway.repo.keydir, host, port) as secret:
        app = create_app(root, gateway=gateway, operator_secret=secret)
        # log_config None: uvicorn's own errors go to the error log open_logs set up.
        config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None)
        server = uvicorn.Server(config)
        listener = bind(host, port)
        announce()
        server.run(sockets=[listener])


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
