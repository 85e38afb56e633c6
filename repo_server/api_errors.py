"""How the publish API answers a failure: every error becomes one status and one message
that says what to do (docs/PUBLISHING.md, "Errors"). The publisher shows the message.

4xx: the request cannot succeed as sent. 503: the repository on the server is in a
state its operator must fix (an expired whitelist or manifest, a damaged catalog).
507: its disk is full. 500: anything unexpected, with the traceback in the server's log.
"""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from cvmfs_format.errors import CvmfsError, PathConflict
from repo_server.errors import Refused, UnknownRevision

log = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ApiError(Exception):
    """An answer decided on purpose: this status, this message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UploadRefused(CvmfsError):
    """What a publisher uploaded cannot be published as it is (422)."""


def unusable_head(exc: CvmfsError) -> ApiError:
    """The server's own head does not verify (expired whitelist or manifest, a key
    rotation left half done): no publish can succeed until the operator acts."""
    return ApiError(
        503,
        f"the repository's signed head does not verify on the server: {exc}; publishing "
        "resumes once its operator has fixed that (`repo-server check DIR` shows the state)",
    )


def answer_for(exc: Exception, doing: str) -> tuple[int, str]:
    """Status and message for an error raised while `doing` (e.g. "storing uploaded
    objects"); an unexpected one is logged with its traceback under a reference."""
    if isinstance(exc, ApiError):
        return exc.status, str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return 507, (
            f"no space left on the repository's disk while {doing} ({exc.strerror}); its "
            "operator must free space (e.g. `repo-server gc`) or grow the disk, then "
            "publish again"
        )
    if isinstance(exc, UploadRefused):
        return 422, str(exc)
    if isinstance(exc, UnknownRevision):
        return 404, str(exc)
    if isinstance(exc, PathConflict | Refused):
        return 409, str(exc)
    if isinstance(exc, CvmfsError):  # the repository on the server, not the request
        return 503, (
            f"the repository on the server cannot take publishes ({exc}) while {doing}; "
            "its operator must repair it (`repo-server check DIR` lists the damage)"
        )
    reference = secrets.token_hex(4)
    log.error("unexpected error %s while %s", reference, doing, exc_info=exc)
    return 500, (
        f"unexpected error on the server while {doing} ({type(exc).__name__}: {exc}); "
        f"its operator finds the details under {reference} in the log of `repo-server serve`"
    )


def guarded(
    handler: Callable[[Request], Awaitable[Response]], doing: str
) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint that runs handler and answers its failures as answer_for says."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening any more
        except Exception as exc:
            status, message = answer_for(exc, doing)
            return JSONResponse({"error": message}, status)

    return endpoint
