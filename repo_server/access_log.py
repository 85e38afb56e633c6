"""The logs of `repo-server serve`: an access log line per request, in nginx's
"combined" format (the Combined Log Format) followed by the request time in seconds,
and the server-error log (tracebacks), both with UTC times (docs/OPERATING.md, "Logs").

One ASGI middleware writes the access log and counts the requests for /metrics.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from repo_server.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

ACCESS_LOGGER = "repo_server.access"
_USER = "access_log_user"  # in the request's state: who the request authenticated as
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def set_user(request: Request, name: str) -> None:
    """Name who made this request in its access log line (a token's name)."""
    setattr(request.state, _USER, name)


def escape(text: str) -> str:
    """As nginx escapes a logged field: quotes, backslashes and non-printable bytes as
    \\xHH, so one request is one parseable line whatever it sent."""
    return "".join(f"\\x{ord(c):02X}" if c in '"\\' or not 32 <= ord(c) < 127 else c for c in text)


def clf_time(when: float) -> str:
    """[10/Oct/2026:13:55:36 +0000]: the Common Log Format's time, in UTC."""
    t = time.gmtime(when)
    clock = time.strftime("%H:%M:%S", t)
    return f"[{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{clock} +0000]"


def log_line(
    client: str,
    user: str | None,
    when: float,
    request_line: str,
    status: int,
    sent: int,
    referer: str | None,
    agent: str | None,
    seconds: float,
) -> str:
    """One access log line: `combined` plus the request time, as nginx's
    `'$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
    "$http_referer" "$http_user_agent" $request_time'` writes it."""
    return (
        f'{client} - {escape(user) if user else "-"} {clf_time(when)} "{escape(request_line)}" '
        f'{status} {sent} "{escape(referer or "-")}" "{escape(agent or "-")}" {seconds:.3f}'
    )


class AccessLog:
    """ASGI middleware: a log line and the /metrics counts for every HTTP request."""

    def __init__(self, app: App, logger: logging.Logger, metrics: Metrics):
        self.app = app
        self.logger = logger
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, when = time.monotonic(), time.time()
        state = scope.setdefault("state", {})
        status, sent = 500, 0  # unless the app answers: Starlette then sends a 500

        async def counting(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            seconds = time.monotonic() - start
            self.metrics.request(scope["method"], status, sent)
            headers = dict(scope.get("headers") or [])
            target = scope.get("raw_path") or scope["path"].encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            client = scope.get("client")
            self.logger.info(
                log_line(
                    client[0] if client else "-",
                    state.get(_USER),
                    when,
                    f"{scope['method']} {target.decode('latin-1')} HTTP/{scope['http_version']}",
                    status,
                    sent,
                    _header(headers, b"referer"),
                    _header(headers, b"user-agent"),
                    seconds,
                )
            )


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


def open_logs(access_file: str | None) -> logging.Logger:
    """The access logger, writing to access_file (reopened when logrotate moves it) or
    to stderr; and the error log on stderr with UTC times, tracebacks included."""
    utc = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    utc.converter = time.gmtime
    _only_handler(logging.getLogger(), logging.StreamHandler(sys.stderr), utc)
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    access: logging.Handler = (
        logging.handlers.WatchedFileHandler(access_file)
        if access_file
        else logging.StreamHandler(sys.stderr)
    )
    _only_handler(logger, access, logging.Formatter("%(message)s"))
    return logger


def _only_handler(logger: logging.Logger, handler: logging.Handler, fmt: logging.Formatter) -> None:
    for old in logger.handlers[:]:
        logger.removeHandler(old)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
