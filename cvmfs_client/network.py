"""What a failed network request means and what to do about it, for every program: one
message per kind (DNS, refused, timeout, TLS, HTTP status, not a repository), whether
pycurl or requests made the request; URL typos; the CA bundle for a private CA.

docs/OPERATING.md, "When something fails", lists the messages.
"""

from __future__ import annotations

import argparse
import enum
import os
import re
from urllib.parse import urlsplit

from cvmfs_client.errors import ClientError, FetchError

CA_BUNDLE_ENV = "CVMFS_CA_BUNDLE"
CA_BUNDLE_HINT = f"--ca-bundle FILE (or {CA_BUNDLE_ENV})"


class Kind(enum.Enum):
    DNS = "dns"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    TLS = "tls"
    CONNECTION = "connection"  # reset, closed, nothing received: a flaky path
    HTTP = "http"


class Role(enum.Enum):
    """What the URL was asked for: the same status means different fixes."""

    READ = "read"  # static files of a repository (client, replicate)
    PUBLISH = "publish"  # the publish API of `repo-server serve`


# Worth asking again (after a pause): the next attempt may find the server up.
TRANSIENT = frozenset({Kind.REFUSED, Kind.TIMEOUT, Kind.CONNECTION})


class NetworkError(FetchError):
    """A request failed; the message names the URL and the likely fix, the summary
    only what failed (for "retrying" notices)."""

    def __init__(
        self, summary: str, fix: str, kind: Kind, *, transient: bool, status: int | None = None
    ):
        super().__init__(f"{summary}; {fix}")
        self.summary = summary
        self.kind = kind
        self.transient = transient
        self.status = status


class LocationError(ClientError):
    """A repository location that is neither a usable URL nor a directory."""


def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.hostname or url


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return parts.netloc
    return f"{parts.hostname}:{port}"


def failure(url: str, kind: Kind, detail: str = "", *, via: str = "") -> NetworkError:
    """The error for a request to url that failed before any HTTP answer. via: the
    proxy the request went through, if any (a proxy's DNS or refusal is its own)."""
    where = f"{url} via {via}" if via else url
    said = f" ({detail})" if detail else ""
    if kind is Kind.DNS:
        name = _host(via) if via else _host(url)
        problem = f"host name {name!r} not found (DNS){said}"
        fix = (
            f"check its spelling in the {'proxy setting' if via else 'URL'}, and the "
            "machine's DNS settings"
        )
    elif kind is Kind.REFUSED:
        problem = f"connection refused by {_host_port(via) if via else _host_port(url)}"
        fix = "is the server running and listening on that port? Check the port, or start it"
    elif kind is Kind.TIMEOUT:
        problem = f"no answer in time{said}"
        fix = "the server or the network is slow or down: try again later, or use another mirror"
    elif kind is Kind.TLS:
        problem = f"TLS certificate verification failed{said}"
        fix = (
            "if the server's certificate comes from a private CA, give that CA's certificate "
            f"with {CA_BUNDLE_HINT}; else check the host name in the URL"
        )
    else:
        problem = f"connection failed{said}"
        fix = "try again later"
    return NetworkError(f"{where}: {problem}", fix, kind, transient=kind in TRANSIENT)


def http_failure(url: str, status: int, role: Role = Role.READ, detail: str = "") -> NetworkError:
    """The error for an HTTP answer other than success (the publish API's own error
    messages, which say what to do themselves, are not passed here)."""
    said = f": {detail}" if detail else ""
    transient = False
    if status == 404:
        problem = "not found"
        fix = (
            "give the URL of a `repo-server serve` (its publish API is under /api/v1), "
            "not of a static web server or a mirror"
            if role is Role.PUBLISH
            else "check the URL's path: it must be the repository's base URL, where "
            "`manifest` and `whitelist` are"
        )
    elif status == 405:
        problem = "method not allowed"
        fix = (
            "publishing needs the URL of a `repo-server serve`, not of a static web server "
            "or a mirror"
            if role is Role.PUBLISH
            else "the server does not serve files there; check the URL"
        )
    elif status >= 500:
        problem, transient = "server error", True
        fix = "the server or a proxy in between is failing: try again later, or tell its operator"
    elif status == 407:
        problem, fix = "proxy authentication required", "check the proxy setting"
    elif status in (401, 403):
        problem = "access refused"
        fix = "the web server or a proxy refuses access; check its access rules"
    else:
        problem, fix = "unexpected answer", "check the URL"
    return NetworkError(
        f"{url}: {problem} (HTTP {status}{said})",
        fix,
        Kind.HTTP,
        transient=transient,
        status=status,
    )


def not_a_repository(location: str, why: str) -> ClientError:
    """A server or directory that answers, but has no repository there."""
    return ClientError(
        f"{location}: not a repository ({why}); give the repository's base URL or "
        "directory: where its `manifest` and `whitelist` are"
    )


# -- pycurl ---------------------------------------------------------------------------

_CURL_KINDS = {
    5: Kind.DNS,  # CURLE_COULDNT_RESOLVE_PROXY
    6: Kind.DNS,  # CURLE_COULDNT_RESOLVE_HOST
    7: Kind.REFUSED,  # CURLE_COULDNT_CONNECT
    28: Kind.TIMEOUT,  # CURLE_OPERATION_TIMEDOUT
    35: Kind.TLS,  # CURLE_SSL_CONNECT_ERROR (handshake)
    51: Kind.TLS,  # CURLE_PEER_FAILED_VERIFICATION
    58: Kind.TLS,  # CURLE_SSL_CERTPROBLEM
    60: Kind.TLS,  # CURLE_SSL_CACERT
    77: Kind.TLS,  # CURLE_SSL_CACERT_BADFILE
    83: Kind.TLS,  # CURLE_SSL_ISSUER_ERROR
    90: Kind.TLS,  # CURLE_SSL_PINNEDPUBKEYNOTMATCH
    91: Kind.TLS,  # CURLE_SSL_INVALIDCERTSTATUS
}


def from_curl(url: str, code: int, detail: str, *, via: str = "") -> NetworkError:
    return failure(url, _CURL_KINDS.get(code, Kind.CONNECTION), detail, via=via)


# -- requests (without importing it: the client does not depend on it) -----------------

_TIMEOUT_NAMES = {"ReadTimeout", "ConnectTimeout", "ReadTimeoutError", "TimeoutError", "timeout"}


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and every exception it wraps (urllib3 keeps the cause in `reason` or args)."""
    found: list[BaseException] = []
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None)])
        todo.extend(item.args)
    return found


def from_exception(url: str, exc: BaseException) -> NetworkError:
    """Classify what requests (or the socket and ssl modules) raised."""
    import socket
    import ssl

    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolutionError" in names:
        kind = Kind.DNS
    elif any(isinstance(e, ssl.SSLError) for e in chain) or "SSLError" in names:
        kind = Kind.TLS
    elif any(isinstance(e, ConnectionRefusedError) for e in chain):
        kind = Kind.REFUSED
    elif names & _TIMEOUT_NAMES:
        kind = Kind.TIMEOUT
    else:
        kind = Kind.CONNECTION
    innermost = chain[-1] if chain else exc
    detail = str(getattr(innermost, "reason", None) or innermost).strip()
    if kind is Kind.DNS:
        detail = ""
    return failure(url, kind, detail[:200])


# -- locations --------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$", re.DOTALL)
_KNOWN = ("http", "https", "s3")


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def check_location(location: str, *, urls: bool = True, s3: bool = False) -> None:
    """Refuse a location that looks like a mistyped URL (`htp://host/repo`,
    `http:/host`), instead of taking it for a directory of that name; and a URL
    where the command takes none. A path that exists is always a path."""
    match = _SCHEME.match(location)
    if match is None:
        if re.match(r"^(https?|s3)//", location) and not os.path.exists(location):
            raise LocationError(f"{location}: not a URL (a ':' is missing after the scheme)")
        return
    if os.path.exists(location):
        return
    scheme, slashes, rest = match.groups()
    lower = scheme.lower()
    if lower in _KNOWN and slashes == "//" and rest and scheme == lower:
        if lower == "s3" and not s3:
            raise LocationError(f"{location}: this command does not read s3:// locations")
        if lower != "s3" and not urls:
            raise LocationError(
                f"{location}: this command takes a repository directory"
                + (" or s3://BUCKET[/PREFIX]" if s3 else "")
                + ", not an http(s) URL (read a served repository with cvmfs-client, or "
                "mirror it with `repo-server replicate URL DIR` and use the mirror)"
            )
        return
    if lower in _KNOWN:
        raise LocationError(f"{location}: malformed URL; expected {lower}://HOST/PATH")
    if slashes:
        raise LocationError(
            f"{location}: unknown URL scheme {scheme!r}; expected http://HOST/PATH or "
            "https://HOST/PATH (or the path of a directory)"
        )


def ca_bundle(given: str | None) -> str | None:
    """The CA certificates to verify servers with: the option, else CVMFS_CA_BUNDLE,
    else None (the system's)."""
    path = given or os.environ.get(CA_BUNDLE_ENV) or None
    if path is not None and not os.path.isfile(path):
        source = "--ca-bundle" if given else CA_BUNDLE_ENV
        raise ClientError(f"{source} {path}: no such file; give a PEM file of CA certificates")
    return path


def add_ca_bundle(parser: argparse.ArgumentParser, *, config_key: bool = False) -> None:
    """--ca-bundle on every command that fetches over https."""
    also = f"{CA_BUNDLE_ENV}" + (", or CVMFS_CA_BUNDLE in --config" if config_key else "")
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help=f"PEM file of the CA certificates that sign the servers' certificates, for a "
        f"private CA (default: the system's; also {also})",
    )
