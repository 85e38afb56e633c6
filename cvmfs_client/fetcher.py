"""Fetching repository files: one protocol, a local-directory and a pycurl HTTP adapter."""

from __future__ import annotations

import io
import os
import threading
import time
from typing import Protocol

import pycurl

from cvmfs_client.errors import FetchError, NotFoundError

CONNECT_TIMEOUT_S = 5
LOW_SPEED_TIME_S = 10  # a server that sends < 1 KiB/s for this long is cut off
RETRIES = 2


class Fetcher(Protocol):
    def fetch(self, relpath: str, max_bytes: int) -> bytes:
        """Return the file at relpath (relative to the repository root).

        Refuses (FetchError) to read more than max_bytes: the endless-data defence.
        Raises NotFoundError if every source answers that the file does not exist.
        """
        ...

    def describe(self) -> str: ...


class DirectoryFetcher:
    """A repository directory on a local or network file system."""

    def __init__(self, root: str):
        self.root = root

    def describe(self) -> str:
        return self.root

    def fetch(self, relpath: str, max_bytes: int) -> bytes:
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
        return data


class CurlFetcher:
    """HTTP(S) with connection reuse, mirror failover and bounded retries.

    Mirrors are tried in order; a mirror that fails is skipped for the rest of the
    request but tried again on the next one.
    """

    def __init__(self, urls: list[str], *, timeout_s: float = 30.0):
        if not urls:
            raise FetchError("no repository URL given")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        self._local = threading.local()
        self.bytes_downloaded = 0

    def describe(self) -> str:
        return ";".join(self.urls)

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
            handle.setopt(pycurl.USERAGENT, "cvmfs-client/0.1")
            self._local.curl = handle
        return handle

    def _get(self, url: str, max_bytes: int) -> tuple[int, bytes]:
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
        handle.setopt(pycurl.WRITEFUNCTION, write)
        handle.setopt(pycurl.TIMEOUT_MS, int(self.timeout_s * 1000))
        try:
            handle.perform()
        except pycurl.error as exc:
            if too_large:
                raise FetchError(f"{url}: larger than the expected {max_bytes} bytes") from exc
            raise FetchError(f"{url}: {exc.args[-1]}") from exc
        self.bytes_downloaded += buffer.tell()
        return int(handle.getinfo(pycurl.RESPONSE_CODE)), buffer.getvalue()

    def fetch(self, relpath: str, max_bytes: int) -> bytes:
        errors = []
        not_found = 0
        for attempt in range(RETRIES + 1):
            for base in self.urls:
                url = f"{base}/{relpath}"
                try:
                    status, body = self._get(url, max_bytes)
                except FetchError as exc:
                    errors.append(str(exc))
                    continue
                if status == 200:
                    return body
                if status == 404:
                    not_found += 1
                errors.append(f"{url}: HTTP {status}")
            if not_found == len(self.urls):
                raise NotFoundError(f"{relpath}: not found on any mirror")
            not_found = 0
            if attempt < RETRIES:
                time.sleep(0.2 * 2**attempt)
        raise FetchError(f"{relpath}: every mirror failed ({'; '.join(errors[-len(self.urls) :])})")


def fetcher_for(location: str) -> Fetcher:
    """A repository location is a directory or a ';'-separated list of http(s) URLs."""
    if location.startswith(("http://", "https://")):
        return CurlFetcher([u for u in location.split(";") if u])
    if not os.path.isdir(location):
        raise FetchError(f"{location}: not a directory or an http(s):// URL")
    return DirectoryFetcher(location)
