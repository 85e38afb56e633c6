"""Co-Pilot protocol v1, the agent's side (docs/COPILOT.md): what a manager's answers
mean (`parse_offer`, `parse_job`: checked values or JobError/ManagerError) and how to
ask (`ManagerClient`, one method per agent endpoint over HTTP(S)). Inputs are fetched
through `copy_verified`: never more than their declared size, SHA-256 checked.

Standard library only, imports nothing from cvmbuild: the appliance carries this file
beside its guest agent (with copilot_agent.py, which uses it). The bearer token goes to
the manager's endpoints (also after a 307) and to URLs on the origins of those, never
to other hosts (an S3 upload URL, say).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

API = "/copilot/v1"
MAX_REDIRECTS = 3
HTTP_TIMEOUT_S = 60.0
MAX_INPUT_BYTES = 16 << 30  # the bound for an input that declares no size
CHUNK = 1 << 20


class AgentError(Exception):
    """Base of the agent's errors; the message is one line for a person."""


class JobError(AgentError):
    """A job that cannot run here: reported failed with this message, never run."""


class Unreachable(AgentError):
    """No usable answer (connection failure, timeout, 5xx): worth trying again."""


class ManagerError(AgentError):
    """The manager answered with an error that trying again will not change."""


class Refused(ManagerError):
    """401/403: the token is wrong, revoked or of the wrong kind; the agent stops."""


class LeaseLost(ManagerError):
    """409: the job is no longer this agent's (requeued or cancelled)."""


# -- the pure core: what the manager's answers mean ------------------------------

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Repository:
    name: str
    url: str
    public_key: str = ""  # PEM; empty: the appliance's own key for that name
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Input:
    name: str
    url: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class Job:
    id: str
    command: str
    environment: Mapping[str, str] = field(default_factory=dict)
    repositories: tuple[Repository, ...] = ()
    inputs: tuple[Input, ...] = ()
    outputs: tuple[str, ...] = ()
    lease_s: float = 300.0


@dataclass(frozen=True)
class Lease:
    id: str
    expires_in_s: float


@dataclass(frozen=True)
class Offer:
    """A get-job answer: the lease is usable even when the job itself is not (it is
    then reported failed under that lease)."""

    job_id: str
    lease: Lease
    job: Mapping[str, Any]


@dataclass(frozen=True)
class NoWork:
    retry_after_s: float | None = None


T = TypeVar("T")


def _field(data: Mapping[str, Any], key: str, kind: type[T], where: str, default: Any = ...) -> T:
    if key not in data:
        if default is ...:
            raise JobError(f"{where}: {key} is missing")
        return default  # type: ignore[no-any-return]
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise JobError(f"{where}: {key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _name(value: str, pattern: re.Pattern[str], where: str) -> str:
    if not pattern.match(value) or value in (".", ".."):
        raise JobError(f"{where}: {value!r} is not an acceptable name")
    return value


def parse_offer(data: object) -> Offer:
    """The body of a 200 get-job answer; only the job id and lease are checked here."""
    if not isinstance(data, dict) or not isinstance(data.get("job"), dict):
        raise ManagerError("get job: the answer has no job object")
    lease = data.get("lease")
    job_id = data["job"].get("id")
    if not isinstance(job_id, str) or not job_id or not isinstance(lease, dict):
        raise ManagerError("get job: the answer has no job id or no lease")
    lease_id, expires = lease.get("id"), lease.get("expires_in_s")
    if not isinstance(lease_id, str) or not isinstance(expires, int | float) or expires <= 0:
        raise ManagerError("get job: the lease needs an id and a positive expires_in_s")
    return Offer(job_id, Lease(lease_id, float(expires)), data["job"])


def parse_job(data: Mapping[str, Any]) -> Job:
    """A job object as protocol v1 gives it, checked: names are single path components
    (inputs and outputs live in the job's directory), hashes are lowercase hex."""
    where = f"job {data.get('id')!r}"
    environment = _field(data, "environment", dict, where, {})
    for key, value in environment.items():
        if not _ENV_NAME.match(key) or not isinstance(value, str):
            raise JobError(f"{where}: environment {key!r} must be a name with a string value")
    repositories = []
    for r in _field(data, "repositories", list, where, []):
        if not isinstance(r, dict):
            raise JobError(f"{where}: each repository must be an object")
        name = _name(_field(r, "name", str, where), _REPO_NAME, f"{where}: repository")
        paths = _field(r, "paths", list, f"{where}: repository {name}", [])
        if not all(isinstance(p, str) and p.startswith("/") and ".." not in p for p in paths):
            raise JobError(f"{where}: repository {name}: paths must be absolute, without ..")
        repositories.append(
            Repository(
                name,
                _field(r, "url", str, where, ""),
                _field(r, "public_key", str, where, ""),
                tuple(paths),
            )
        )
    inputs = []
    for i in _field(data, "inputs", list, where, []):
        if not isinstance(i, dict):
            raise JobError(f"{where}: each input must be an object")
        name = _name(_field(i, "name", str, where), _FILE_NAME, f"{where}: input")
        digest = _field(i, "sha256", str, f"{where}: input {name}")
        if not _SHA256.match(digest):
            raise JobError(f"{where}: input {name}: sha256 must be 64 lowercase hex digits")
        size = _field(i, "size", int, f"{where}: input {name}", None)
        if size is not None and size < 0:
            raise JobError(f"{where}: input {name}: size must not be negative")
        url = _field(i, "url", str, f"{where}: input {name}")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise JobError(f"{where}: input {name}: the url must be http:// or https://")
        inputs.append(Input(name, url, digest, size))
    outputs = _field(data, "outputs", list, where, [])
    for name in outputs:
        _name(name if isinstance(name, str) else "", _FILE_NAME, f"{where}: output")
    names = [i.name for i in inputs] + outputs
    if len(set(names)) != len(names):
        raise JobError(f"{where}: inputs and outputs must have distinct names")
    lease_s = _field(data, "lease_s", float, where, 300.0)
    if lease_s <= 0:
        raise JobError(f"{where}: lease_s must be positive")
    return Job(
        id=_field(data, "id", str, where),
        command=_field(data, "command", str, where),
        environment=dict(environment),
        repositories=tuple(repositories),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        lease_s=lease_s,
    )


def parse_retry_after(header: str | None) -> float | None:
    """A Retry-After in seconds (the HTTP-date form is not used by the manager)."""
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


def copy_verified(chunks: Iterable[bytes], out: IO[bytes], expected: Input) -> None:
    """Write chunks to out, never more than the input's declared size (or
    MAX_INPUT_BYTES), and check its size and SHA-256 at the end: JobError otherwise."""
    bound = expected.size if expected.size is not None else MAX_INPUT_BYTES
    digest, count = hashlib.sha256(), 0
    for chunk in chunks:
        count += len(chunk)
        if count > bound:
            raise JobError(f"input {expected.name}: more than the {bound} bytes declared")
        digest.update(chunk)
        out.write(chunk)
    if expected.size is not None and count != expected.size:
        raise JobError(f"input {expected.name}: {count} bytes, {expected.size} declared")
    if digest.hexdigest() != expected.sha256:
        raise JobError(
            f"input {expected.name}: SHA-256 {digest.hexdigest()} is not the job's "
            f"{expected.sha256}"
        )


def error_message(body: bytes, status: int) -> str:
    """The one line a manager's error body says ({"error": ...}), or its first line."""
    try:
        text = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
    line = text.splitlines()[0] if text else http.client.responses.get(status, "")
    return line[:300]


# -- the protocol client -----------------------------------------------------------------


def origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib refuses to repeat a POST on 307; ManagerClient follows redirects itself."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


Body = bytes | Callable[[], IO[bytes]] | None


class ManagerClient:
    """Protocol v1's agent side over HTTP(S): one method per endpoint. A 307/308 is
    followed (MAX_REDIRECTS hops) with the same method and body; errors become
    Refused (401/403), LeaseLost (409), Unreachable (no answer, 408, 429, 5xx) or
    ManagerError (any other)."""

    def __init__(self, url: str, token: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._trusted = {origin(self.url)}  # where the token may go
        self._opener = urllib.request.build_opener(_NoRedirect)

    def _open(
        self, method: str, url: str, body: Body = None, headers: Mapping[str, str] = {}
    ) -> http.client.HTTPResponse:
        api = url.startswith(self.url + API)
        for _hop in range(MAX_REDIRECTS + 1):
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise ManagerError(f"{method} {url}: only http:// and https:// URLs are used")
            sent = dict(headers)
            if api or origin(url) in self._trusted:
                sent["Authorization"] = f"Bearer {self.token}"
            data = body() if callable(body) else body
            request = urllib.request.Request(url, data=data, method=method, headers=sent)
            try:
                return self._opener.open(request, timeout=self.timeout)  # type: ignore[no-any-return]
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location")
                if exc.code not in (307, 308) or not location:
                    raise _error(exc, method, url) from None
                exc.close()
                url = urllib.parse.urljoin(url, location)
                if api:  # the manager sent us to another manager
                    self._trusted.add(origin(url))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise Unreachable(f"{method} {url}: {reason}") from exc
            finally:
                if data is not None and not isinstance(data, bytes):
                    data.close()
        raise ManagerError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")

    def _post(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any, str | None]:
        """POST JSON to an agent endpoint: (status, decoded body or None, Retry-After)."""
        url = f"{self.url}{API}{path}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            with self._open("POST", url, json.dumps(body).encode(), headers) as response:
                raw = response.read()
                status, retry = response.status, response.headers.get("Retry-After")
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"POST {url}: {exc}") from exc
        if not raw:
            return status, None, retry
        try:
            return status, json.loads(raw), retry
        except ValueError:
            raise ManagerError(f"POST {url}: the answer is not JSON") from None

    def get_job(self, agent: str, resources: Mapping[str, int]) -> Offer | NoWork:
        status, data, retry = self._post("/jobs/get", {"agent": agent, "resources": resources})
        if status == 204 or data is None:
            return NoWork(parse_retry_after(retry))
        return parse_offer(data)

    def heartbeat(self, job_id: str, lease: str, progress: float | None) -> float | None:
        """Renew the lease; returns its new life in seconds when the manager says."""
        body: dict[str, Any] = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        _, data, _ = self._post(f"/jobs/{_quote(job_id)}/heartbeat", body)
        expires = data.get("expires_in_s") if isinstance(data, dict) else None
        return float(expires) if isinstance(expires, int | float) and expires > 0 else None

    def output_locations(self, job_id: str, lease: str) -> dict[str, str]:
        _, data, _ = self._post(f"/jobs/{_quote(job_id)}/output-location", {"lease": lease})
        uploads = data.get("uploads") if isinstance(data, dict) else None
        if not isinstance(uploads, list):
            raise ManagerError(f"output location of job {job_id}: no uploads in the answer")
        return {
            str(u.get("name")): urllib.parse.urljoin(self.url + "/", str(u.get("url")))
            for u in uploads
            if isinstance(u, dict)
        }

    def upload(self, url: str, lease: str, path: str, sha256: str) -> None:
        size = os.path.getsize(path)
        headers = {
            "X-Copilot-Lease": lease,
            "X-Content-SHA256": sha256,
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
        }
        try:
            with self._open("PUT", url, lambda: open(path, "rb"), headers) as response:
                response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"PUT {url}: {exc}") from exc

    def done(
        self, job_id: str, lease: str, exit_code: int, outputs: Mapping[str, str], message: str
    ) -> str:
        body = {"lease": lease, "exit_code": exit_code, "outputs": dict(outputs),
                "message": message}  # fmt: skip
        _, data, _ = self._post(f"/jobs/{_quote(job_id)}/done", body)
        return str(data.get("state", "")) if isinstance(data, dict) else ""

    def fetch(self, url: str, out: IO[bytes], expected: Input) -> None:
        """GET an input into out, bounded and verified (copy_verified)."""
        try:
            with self._open("GET", url) as response:
                copy_verified(iter(lambda: response.read(CHUNK), b""), out, expected)
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"GET {url}: {exc}") from exc


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def _error(exc: urllib.error.HTTPError, method: str, url: str) -> AgentError:
    try:
        body = exc.read()
    except (OSError, http.client.HTTPException):
        body = b""
    finally:
        exc.close()
    text = f"{method} {url}: {exc.code} {error_message(body, exc.code)}"
    if exc.code in (401, 403):
        return Refused(text)
    if exc.code == 409:
        return LeaseLost(text)
    if exc.code >= 500 or exc.code in (408, 429):
        return Unreachable(text)
    return ManagerError(text)
