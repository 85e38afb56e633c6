"""`cvmbuild publish` to a repo-server over HTTP: a lease, packed uploads, a commit.

The publisher does all the work it does locally (hash, chunk, compress, catalogs) but
asks the server which objects it lacks and sends only those, many per request. Packs
are idempotent, so a dropped connection is retried, and a publish run again after a
failure uploads only what did not arrive (docs/PUBLISHING.md).
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import requests

from cvmbuild.errors import BuildError
from cvmfs_client import network
from cvmfs_client.network import Role
from cvmfs_format.catalog_writer import Subtree
from cvmfs_format.pack import API, MISSING_LIMIT, encode_pack, pack_overhead
from cvmfs_format.version import product_version

PACK_TARGET = 8 << 20  # bytes per upload request
UPLOAD_WORKERS = 4
ATTEMPTS = 4  # per request, with backoff: a dropped connection is not a failed publish
LEASE_RENEW_S = 20  # servers give a lease up after (by default) 120 s without a request
LEASE_WAIT_S = 600  # how long to wait for another publisher of an overlapping path
TIMEOUT_S = (10, 300)  # connect, read (a commit of a big tree takes a while)


class Gateway:
    """The publish API of one repo-server, seen from a publisher."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        ca_bundle: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.sleep = sleep
        self.ca_bundle = ca_bundle
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
            session.headers["User-Agent"] = f"cvmbuild/{product_version()}"
            self._local.session = session
        return session

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON answer of an API call. Retries with backoff what a retry can fix: a
        refused or dropped connection, a timeout, a proxy's 5xx while the server
        restarts; not a wrong host name or certificate. An error the server itself
        answered is final (GatewayRefusal): every request may be sent twice (uploads
        are idempotent; a commit sent again gets the first's outcome)."""
        url = f"{self.url}{API}{path}"
        if self.ca_bundle is not None:
            # Per request: requests lets REQUESTS_CA_BUNDLE override a session's verify.
            kwargs["verify"] = self.ca_bundle
        for attempt in range(ATTEMPTS):
            try:
                response = self._session().request(method, url, timeout=TIMEOUT_S, **kwargs)
            except requests.RequestException as exc:
                error = network.from_exception(url, exc)
            else:
                if response.status_code < 300:
                    return response.json() if response.content else None
                message = _server_message(response)
                if message is not None:
                    raise GatewayRefusal(response.status_code, message)
                error = network.http_failure(
                    url, response.status_code, Role.PUBLISH, response.reason
                )
            if not error.transient:
                break
            if attempt + 1 < ATTEMPTS:
                _say(f"{error.summary}; retrying ({attempt + 2} of {ATTEMPTS})")
                self.sleep(0.5 * 2**attempt)
        raise BuildError(str(error))

    @contextlib.contextmanager
    def lease(
        self, path: str, wait_s: float = LEASE_WAIT_S, dry_run: bool = False
    ) -> Iterator[str]:
        """Hold the lease on path for the block; waits while someone publishes there.
        A dry run's lease keeps what is uploaded on it in the server's memory, for its
        preview, and stores nothing."""
        deadline = time.monotonic() + wait_s
        said = False
        # Asked again after a lost answer, the server gives this publisher its own lease
        # back instead of making it wait for it to expire.
        ask: dict[str, object] = {"path": path, "publisher": secrets.token_hex(16)}
        if dry_run:
            ask["dry_run"] = True
        while True:
            try:
                lease = str(self.request("POST", "/leases", json=ask)["lease"])
                break
            except GatewayRefusal as exc:
                if exc.status != 409 or time.monotonic() > deadline:
                    raise exc.as_build_error() from None
                if not said:
                    _say(f"{exc.message}...")
                    said = True
                self.sleep(1.0)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(lease, stop), name="lease-renewer", daemon=True
        )
        renewer.start()
        try:
            yield lease
        except BaseException:
            with contextlib.suppress(BuildError, GatewayRefusal):
                self.request("DELETE", f"/leases/{lease}")
            raise
        finally:
            stop.set()
            renewer.join()

    def _renew(self, lease: str, stop: threading.Event) -> None:
        """Keep the lease while the publisher hashes for minutes without a request."""
        while not stop.wait(LEASE_RENEW_S):
            try:
                self.request("POST", f"/leases/{lease}/renew")
            except (BuildError, GatewayRefusal) as exc:  # the next real request reports it
                _say(f"renewing the lease failed: {exc}")

    def missing(self, digests: Iterable[str]) -> set[str]:
        wanted = sorted(set(digests))
        missing: set[str] = set()
        for start in range(0, len(wanted), MISSING_LIMIT):
            batch = wanted[start : start + MISSING_LIMIT]
            missing.update(
                self.call("POST", "/objects/missing", json={"digests": batch})["missing"]
            )
        return missing

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self.request(method, path, **kwargs)
        except GatewayRefusal as exc:
            raise exc.as_build_error() from None


class GatewayRefusal(Exception):
    """The server answered with an error of its own (docs/PUBLISHING.md, "Errors"):
    retrying the same request will not help; its message says what will."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    def as_build_error(self) -> BuildError:
        if self.status == 507:
            return BuildError(f"the server's disk is full: {self.message}")
        if self.status >= 500:
            return BuildError(f"the server failed: {self.message}")
        hint = {
            401: " (check --token-file or CVMBUILD_TOKEN)",
            403: " (ask the repository operator for a token covering this path)",
        }.get(self.status, "")
        return BuildError(f"the server refused: {self.message}{hint}")


def _server_message(response: requests.Response) -> str | None:
    """The message of an error the publish API answered itself, or None (a proxy's)."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UploadStorage:
    """The parts of the Storage protocol a publish uses, over the publish API.

    Objects are collected into packs and sent by a small pool of uploaders; `flush`
    waits until every pack has arrived. Digests known to be on the server (asked or
    sent) are remembered, so nothing is asked about or sent twice.
    """

    def __init__(self, gateway: Gateway, lease: str):
        self.gateway = gateway
        self.lease = lease
        self._known: set[str] = set()
        self._pack: list[tuple[str, bytes]] = []
        self._pack_bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="upload")
        self._inflight = threading.BoundedSemaphore(UPLOAD_WORKERS * 2)  # bounds memory
        self._futures: list[Future[None]] = []
        self.uploaded_bytes = 0

    def has(self, digest: str) -> bool:
        return not self.missing([digest])

    def missing(self, digests: Iterable[str]) -> set[str]:
        with self._lock:
            unknown = {d for d in digests if d not in self._known}
        if not unknown:
            return set()
        missing = self.gateway.missing(unknown)
        with self._lock:
            self._known.update(unknown - missing)
        return missing

    def put_object(self, digest: str, stored: bytes) -> bool:
        with self._lock:
            if digest in self._known:
                return False
            self._known.add(digest)
            self._pack.append((digest, stored))
            self._pack_bytes += len(stored) + pack_overhead()
            full = self._pack_bytes >= PACK_TARGET
            pack = self._take() if full else None
        if pack:
            self._send(pack)
        return True

    def _take(self) -> list[tuple[str, bytes]]:
        pack, self._pack, self._pack_bytes = self._pack, [], 0
        return pack

    def _send(self, pack: list[tuple[str, bytes]]) -> None:
        self._inflight.acquire()
        try:
            future = self._pool.submit(self._upload, pack)
        except BaseException:
            self._inflight.release()
            raise
        with self._lock:
            self._futures.append(future)

    def _upload(self, pack: list[tuple[str, bytes]]) -> None:
        try:
            body = encode_pack(pack)
            self.gateway.call("POST", f"/leases/{self.lease}/objects", data=body)
            with self._lock:
                self.uploaded_bytes += len(body)
        finally:
            self._inflight.release()

    def flush(self) -> None:
        """Send what is left and wait for every upload; the first failure is raised."""
        with self._lock:
            pack = self._take()
        if pack:
            self._send(pack)
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def get_object(self, digest: str) -> bytes:
        raise BuildError("reading objects back is not part of publishing over HTTP")

    def sync(self) -> None:
        self.flush()


def commit(
    gateway: Gateway, lease: str, ask: dict[str, object], *, dry_run: bool = False
) -> dict[str, Any]:
    """Ask the server to end the lease with a new revision (docs/PUBLISHING.md,
    "Commit"): the uploaded subtree grafted, or the path removed or rolled back; a dry
    run asks what that would change instead (a route of its own, which a server that
    does not know it refuses rather than commits)."""
    route = "preview" if dry_run else "commit"
    answer = gateway.call(
        "POST", f"/leases/{lease}/{route}", json={**ask, "tool": f"cvmbuild {product_version()}"}
    )
    return dict(answer)


def subtree_request(subtree: Subtree) -> dict[str, object]:
    return {"catalog": subtree.catalog.hash, "mode": subtree.mode, "mtime_ns": subtree.mtime_ns}
