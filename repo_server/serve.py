"""`repo-server serve`: the repository's static files over HTTP on an ASGI stack.

GET and HEAD only for now; Range and ETag come from Starlette's FileResponse. Objects
are immutable and cached for a year; the manifest and whitelist for a short time.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from cvmfs_client.objects import is_hash
from cvmfs_client.repository import MANIFEST_FILE, WHITELIST_FILE

IMMUTABLE = "public, max-age=31536000, immutable"


def cache_control(relpath: str, ttl: int) -> str | None:
    if relpath in (MANIFEST_FILE, WHITELIST_FILE):
        return f"public, max-age={min(ttl, 60)}"
    parts = relpath.split("/")
    if len(parts) == 3 and parts[0] == "data" and is_hash(parts[1] + parts[2]):
        return IMMUTABLE
    return None  # anything else (lock, txn) is not part of the served repository


def create_app(root: Path, ttl: int = 60) -> Starlette:
    root = root.resolve()

    async def serve_file(request: Request) -> Response:
        relpath = request.path_params["path"]
        policy = cache_control(relpath, ttl)
        if policy is None:
            return PlainTextResponse("not found\n", status_code=404)
        full = os.path.join(root, relpath)
        if not os.path.isfile(full):
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(
            full, headers={"Cache-Control": policy}, media_type="application/octet-stream"
        )

    async def index(request: Request) -> Response:
        return PlainTextResponse(f"cvmfs-py repository {root.name}\n")

    return Starlette(
        routes=[
            Route("/", index, methods=["GET", "HEAD"]),
            Route("/{path:path}", serve_file, methods=["GET", "HEAD"]),
        ]
    )


def serve(root: Path, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(root), host=host, port=port, log_level="warning", access_log=False)
