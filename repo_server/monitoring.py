"""GET /health and GET /metrics of `repo-server serve` (docs/OPERATING.md, "Monitoring").

/health answers 200 with the served revision while clients accept the head, and 503
with the reason once they do not (an expired whitelist, a bad signature): what a load
balancer or systemd watchdog asks. /metrics is for Prometheus (metrics.py).
"""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cvmfs_format.errors import CvmfsError
from cvmfs_format.signed import format_time
from repo_server.errors import KeyError_
from repo_server.leases import Leases
from repo_server.metrics import CONTENT_TYPE, HeadState, Metrics
from repo_server.repository import LocalRepository

NO_STORE = {"Cache-Control": "no-store"}


def head_state(repo: LocalRepository) -> HeadState | None:
    """The head as clients see it; without the master public key (a mirror served with
    no key directory) only its expiries are checked. None if it cannot be read."""
    verified, problem = True, None
    try:
        repo.trust()
    except KeyError_:
        verified = False  # no public key here: the signatures cannot be checked
    except CvmfsError as exc:
        problem = str(exc)
    try:
        head, whitelist = repo.head_unverified(), repo.whitelist()
    except CvmfsError:
        return None
    now = time.time()
    if problem is None and not verified:
        for what, expires in (("whitelist", whitelist.expires), ("manifest", head.expires)):
            if now >= expires:
                problem = f"the {what} expired at {format_time(expires)}"
    return HeadState(
        head.name,
        head.revision,
        head.published,
        head.expires,
        whitelist.expires,
        verified,
        problem,
    )


def routes(repo: LocalRepository, metrics: Metrics, leases: Leases) -> list[Route]:
    async def health(request: Request) -> Response:
        head = await run_in_threadpool(head_state, repo)
        if head is None:
            body: dict[str, object] = {"status": "failing", "problem": "no readable manifest"}
            return JSONResponse(body, 503, headers=NO_STORE)
        body = {
            "status": "ok" if head.problem is None else "failing",
            "name": head.name,
            "revision": head.revision,
            "published": format_time(head.published),
            "manifest_expires": format_time(head.manifest_expires),
            "whitelist_expires": format_time(head.whitelist_expires),
            "verified": head.verified,
            "problem": head.problem,
        }
        return JSONResponse(body, 200 if head.problem is None else 503, headers=NO_STORE)

    async def exposition(request: Request) -> Response:
        head = await run_in_threadpool(head_state, repo)
        text = metrics.render(head, len(leases.listing()))
        return Response(text, headers={**NO_STORE, "Content-Type": CONTENT_TYPE})

    return [
        Route("/health", health, methods=["GET", "HEAD"]),
        Route("/metrics", exposition, methods=["GET", "HEAD"]),
    ]
