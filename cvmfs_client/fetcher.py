"""Fetching repository files: one protocol, a local-directory and a pycurl HTTP adapter."""

from __future__ import annotations

import gc
import io
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar

import pycurl

from cvmfs_client import network
from cvmfs_client.errors import FetchError
from cvmfs_client.network import NetworkError
from cvmfs_format.durable import write_atomic
from cvmfs_format.errors import FormatError, NotFoundError, VerificationError
from cvmfs_format.version import product_version

CONNECT_TIMEOUT_S = 5
LOW_SPEED_TIME_S = 10  # a server that sends < 1 KiB/s for this long is cut off
RETRIES = 2


T = TypeVar("T")
log = logging.getLogger(__name__)


class Fetcher(Protocol):
    def fetch(self, relpath: str, max_bytes: int, decode: Callable[[bytes], T]) -> T:
        """Return decode(the file at relpath), relative to the repository root.

        Refuses (FetchError) to read more than max_bytes: the endless-data defence.
        When decode raises VerificationError the next source is tried, so one bad
        mirror or proxy cannot stop a reader. Raises NotFoundError if every source
        answers that the file does not exist.
        """
        ...

    def describe(self) -> str: ...


class DirectoryFetcher:
    """A repository directory on a local or network file system."""

    def __init__(self, root: str):
        self.root = root

    def describe(self) -> str:
        return self.root

    def fetch(self, relpath: str, max_bytes: int, decode: Callable[[bytes], T]) -> T:
        path = os.path.join(self.root, relpath)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{path}: no such file in the repository") from exc
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror}") from exc
        if len(data) > max_bytes:
            raise FetchError(f"{path}: larger than the expected {max_bytes} bytes")
        return decode(data)


class DeadlinePassed(FetchError):
    """The job's overall time limit ran out: no further attempt is made."""


class _TooLarge(FetchError):
    """A reply over the size bound: another attempt at the same source will not help."""


DIRECT = "DIRECT"


def parse_proxies(spec: str) -> list[list[str]]:
    """CernVM-FS proxy syntax: `;` separates fail-over groups, `|` load-balances
    inside a group; DIRECT means no proxy. An empty spec is DIRECT."""
    groups = [[p.strip() for p in group.split("|") if p.strip()] for group in spec.split(";")]
    groups = [g for g in groups if g]
    for group in groups:
        for proxy in group:
            if proxy != DIRECT and not proxy.startswith(("http://", "https://")):
                raise FetchError(f"proxy {proxy!r}: expected http://HOST:PORT or DIRECT")
    return groups or [[DIRECT]]


# libcurl's handles do not survive a fork (the mount's daemon, replicate's workers): their
# DNS resolver pool waits, on cleanup, for threads that stayed in the parent, holding the
# GIL for good. So garbage handles are cleaned up before a fork, where those threads
# still run, and in the child each fetcher starts with no handle; the handles it had are
# kept, never cleaned up there. (Seen: a mount daemon hung forever at its first garbage
# collection, finalizing the handle of a fetcher the parent had made to choose a key.)
_fetchers: weakref.WeakSet[CurlFetcher] = weakref.WeakSet()
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    for fetcher in list(_fetchers):
        _inherited.append(fetcher._local)
        fetcher._local = threading.local()
        fetcher._lock = threading.Lock()


os.register_at_fork(before=gc.collect, after_in_child=_after_fork_in_child)


class CurlFetcher:
    """HTTP(S) with connection reuse, proxies, mirror failover and bounded retries.

    Routes are tried proxy group by proxy group (a random order inside a group spreads
    the load), and within a proxy mirror by mirror; the route that last worked is
    tried first next time.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        proxies: str = "",
        timeout_s: float = 30.0,
        deadline: float | None = None,
        ca_bundle: str | None = None,
    ):
        """deadline: a time.monotonic() after which every fetch fails at once (a job's
        overall time limit, e.g. `repo-server replicate --timeout`). ca_bundle: a PEM
        file of the CA certificates that sign the servers' (default: the system's)."""
        if not urls:
            raise FetchError("no repository URL given")
        for url in urls:
            network.check_location(url)
        self.urls = [u.rstrip("/") for u in urls]
        self.ca_bundle = ca_bundle
        self.proxy_groups = parse_proxies(proxies)
        self.timeout_s = timeout_s
        self.deadline = deadline
        self._local = threading.local()
        self._lock = threading.Lock()
        self._preferred: tuple[str, str] | None = None
        self.bytes_downloaded = 0
        self.failures = 0
        _fetchers.add(self)

    def __getstate__(self) -> dict[str, object]:
        # To a worker process: the settings, not the connections or locks.
        state = self.__dict__.copy()
        del state["_local"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()
        _fetchers.add(self)

    def count(self, downloaded: int, failures: int, route: tuple[str, str] | None) -> None:
        """Add what a worker process's copy of this fetcher did (fetch_pool.py), and
        take the route that worked for it (what `stat` shows as host and proxy)."""
        with self._lock:
            self.bytes_downloaded += downloaded
            self.failures += failures
            if route is not None:
                self._preferred = route

    @property
    def preferred(self) -> tuple[str, str] | None:
        """The route that last worked, if any did."""
        return self._preferred

    def _time_left(self) -> float:
        """Seconds this request may take: the per-request timeout, or less before the
        deadline; DeadlinePassed once it has."""
        if self.deadline is None:
            return self.timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed("the time allowed for the whole job ran out")
        return min(self.timeout_s, left)

    def describe(self) -> str:
        return ";".join(self.urls)

    @property
    def current(self) -> tuple[str, str]:
        """(mirror, proxy) of the route in use."""
        return self._preferred or (self.urls[0], self.proxy_groups[0][0])

    def _handle(self) -> pycurl.Curl:
        handle = getattr(self._local, "curl", None)
        if handle is None:
            handle = pycurl.Curl()
            handle.setopt(pycurl.FOLLOWLOCATION, 1)
            handle.setopt(pycurl.MAXREDIRS, 3)
            handle.setopt(pycurl.CONNECTTIMEOUT, CONNECT_TIMEOUT_S)
            handle.setopt(pycurl.LOW_SPEED_LIMIT, 1024)
            handle.setopt(pycurl.LOW_SPEED_TIME, LOW_SPEED_TIME_S)
            handle.setopt(pycurl.NOSIGNAL, 1)
            handle.setopt(pycurl.USERAGENT, f"cvmfs-client/{product_version()}")
            if self.ca_bundle is not None:
                handle.setopt(pycurl.CAINFO, self.ca_bundle)
            self._local.curl = handle
        return handle

    def _get(self, url: str, proxy: str, max_bytes: int) -> tuple[int, bytes]:
        handle = self._handle()
        buffer = io.BytesIO()
        too_large = False

        def write(chunk: bytes) -> int | None:
            nonlocal too_large
            if buffer.tell() + len(chunk) > max_bytes:
                too_large = True
                return 0  # any count other than len(chunk) makes curl abort
            buffer.write(chunk)
            return None

        handle.setopt(pycurl.URL, url)
        handle.setopt(pycurl.PROXY, "" if proxy == DIRECT else proxy)
        handle.setopt(pycurl.WRITEFUNCTION, write)
        handle.setopt(pycurl.TIMEOUT_MS, max(1, int(self._time_left() * 1000)))
        via = "" if proxy == DIRECT else proxy
        try:
            handle.perform()
        except pycurl.error as exc:
            if too_large:
                raise _TooLarge(f"{url}: larger than the expected {max_bytes} bytes") from exc
            self._time_left()  # a timeout that was the deadline's ends the job
            raise network.from_curl(url, exc.args[0], exc.args[-1], via=via) from exc
        with self._lock:
            self.bytes_downloaded += buffer.tell()
        return int(handle.getinfo(pycurl.RESPONSE_CODE)), buffer.getvalue()

    def _routes(self) -> list[tuple[str, str]]:
        routes: list[tuple[str, str]] = []
        for group in self.proxy_groups:
            for proxy in random.sample(group, len(group)):
                routes.extend((url, proxy) for url in self.urls)
        preferred = self._preferred
        if preferred in routes:
            routes.remove(preferred)
            routes.insert(0, preferred)
        return routes

    def fetch(self, relpath: str, max_bytes: int, decode: Callable[[bytes], T]) -> T:
        """Every route is tried; those that failed in a way a retry may fix (refused,
        timeout, 5xx) are tried again after a pause, the others (DNS, TLS, 404, a wrong
        answer) are not: a mistyped host name fails at once."""
        failed: dict[tuple[str, str], FetchError] = {}  # the last error of each route
        final: set[tuple[str, str]] = set()  # routes a retry will not help
        not_found: set[tuple[str, str]] = set()
        refused: FetchError | None = None  # a wrong answer: the likeliest cause
        for attempt in range(RETRIES + 1):
            routes = [route for route in self._routes() if route not in final]
            if not routes:
                break
            if attempt:
                time.sleep(min(0.2 * 2 ** (attempt - 1), self._time_left()))
            for route in routes:
                base, proxy = route
                url = f"{base}/{relpath}"
                try:
                    status, body = self._get(url, proxy, max_bytes)
                    if status == 200:
                        result = decode(body)
                        self._preferred = route
                        log.debug("%s: %d bytes from %s via %s", relpath, len(body), base, proxy)
                        return result
                    where = url if proxy == DIRECT else f"{url} via {proxy}"
                    error: FetchError = network.http_failure(where, status)
                    if status == 404:
                        not_found.add(route)
                    if not (isinstance(error, NetworkError) and error.transient):
                        final.add(route)
                except (_TooLarge, VerificationError, FormatError) as exc:
                    error = FetchError(str(exc) if str(exc).startswith(url) else f"{url}: {exc}")
                    final.add(route)
                    refused = error
                except DeadlinePassed as exc:
                    raise DeadlinePassed(f"{relpath}: {exc}") from None
                except FetchError as exc:
                    error = exc
                    if isinstance(exc, NetworkError) and not exc.transient:
                        final.add(route)
                failed[route] = error
                with self._lock:
                    self.failures += 1
                log.warning("%s: %s; trying the next mirror or proxy", relpath, error)
        if not_found and not_found >= set(self._routes()):
            if len(not_found) == 1:
                base, _ = next(iter(not_found))
                raise NotFoundError(f"{base}/{relpath}: not found (HTTP 404)")
            raise NotFoundError(f"{relpath}: not found on any mirror (HTTP 404)")
        if len(failed) == 1:
            raise next(iter(failed.values()))
        shown = list(failed.values())[-3:]
        if refused is not None and refused not in shown:
            shown = [refused, *shown[-2:]]
        said = "; ".join(str(e) for e in shown)
        raise FetchError(f"{relpath}: every mirror failed: {said}")


def fetcher_for(location: str, proxies: str = "", ca_bundle: str | None = None) -> Fetcher:
    """A repository location is a directory or a ';'-separated list of http(s) URLs."""
    if network.is_url(location):
        urls = [u for u in location.split(";") if u]
        return CurlFetcher(urls, proxies=proxies, ca_bundle=network.ca_bundle(ca_bundle))
    network.check_location(location)
    if not os.path.isdir(location):
        raise FetchError(f"{location}: not a directory or an http(s):// URL")
    return DirectoryFetcher(location)


class OfflineFallback:
    """Keeps the last verified whitelist and manifest on local disk and falls back to
    them when no source answers, so a mount comes up offline from a warm cache. The
    saved copies are verified again on every use (signatures, expiry, revision)."""

    def __init__(self, inner: Fetcher, directory: str, documents: frozenset[str], prefix: str):
        self.inner = inner
        self.directory = directory
        self.prefix = prefix
        self.documents = documents
        self.offline = False

    def describe(self) -> str:
        return self.inner.describe()

    def fetch(self, relpath: str, max_bytes: int, decode: Callable[[bytes], T]) -> T:
        if relpath not in self.documents:
            return self.inner.fetch(relpath, max_bytes, decode)
        saved = os.path.join(self.directory, f"{self.prefix}.{relpath}")
        accepted: list[bytes] = []

        def keep(data: bytes) -> T:
            value = decode(data)
            accepted.append(data)
            return value

        try:
            value = self.inner.fetch(relpath, max_bytes, keep)
        except NotFoundError:
            raise
        except FetchError as exc:
            try:
                with open(saved, "rb") as f:
                    data = f.read(max_bytes + 1)
            except FileNotFoundError:
                raise exc from None
            log.warning("%s: no source answers (%s); using the copy saved offline", relpath, exc)
            self.offline = True
            return decode(data)
        write_atomic(saved, accepted[-1])
        self.offline = False
        return value
