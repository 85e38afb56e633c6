"""How S3Storage.missing() should ask S3 about many digests: HEAD each, or list data/xx/.

Fills a bucket prefix with N objects, then asks about N digests (half stored, half
not) and about one publisher batch (32 digests), once per strategy; prints seconds,
requests and the ratio HEAD/LIST. Against moto on loopback unless --endpoint-url
names another S3 (credentials from the AWS_* environment).

    /tmp/venv/bin/python bench/s3_missing.py [--objects 10000] [--endpoint-url URL]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from repo_server import s3_storage
from repo_server.s3_storage import S3Storage, make_client

BATCH = 32  # cvmbuild/ingest.py BATCH_FILES: what one publisher thread asks at once


@contextmanager
def moto() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def digests(n: int, salt: str) -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


class CountingClient:
    """The boto3 client, counting the requests each strategy makes."""

    def __init__(self, inner: object):
        self.inner = inner
        self.requests = 0
        inner.meta.events.register("before-send.s3", self._count)  # type: ignore[attr-defined]

    def _count(self, **kwargs: object) -> None:
        self.requests += 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def measure(storage: S3Storage, counter: CountingClient, asked: list[str], list_from: int) -> str:
    s3_storage.LIST_FROM = list_from
    with storage._lock:  # a fresh process: nothing known yet
        storage._present.clear()
        storage._absent.clear()
    counter.requests = 0
    start = time.perf_counter()
    absent = storage.missing(asked)
    seconds = time.perf_counter() - start
    return f"{seconds:7.2f} s {counter.requests:6d} requests ({len(absent)} missing)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--endpoint-url", help="S3 to measure (default: moto on loopback)")
    args = parser.parse_args()
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with moto() if args.endpoint_url is None else _given(args.endpoint_url) as endpoint:
        client = make_client(endpoint)
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        counter = CountingClient(client)
        storage = S3Storage(bucket, "repo", counter)
        stored = digests(args.objects, "stored")
        start = time.perf_counter()
        with ThreadPoolExecutor(s3_storage.WORKERS) as pool:
            list(pool.map(lambda d: storage._put(storage._key(d), b"x", "no-cache"), stored))
        print(f"filled {args.objects} objects in {time.perf_counter() - start:.1f} s")
        default = s3_storage.LIST_FROM
        half = args.objects // 2
        cases = {
            f"{args.objects} digests": stored[:half] + digests(args.objects - half, "new"),
            f"{BATCH} digests": stored[: BATCH // 2] + digests(BATCH // 2, "new"),
        }
        for title, asked in cases.items():
            head = measure(storage, counter, asked, list_from=10**9)
            listed = measure(storage, counter, asked, list_from=1)
            chosen = measure(storage, counter, asked, list_from=default)
            print(f"{title:>16}: HEAD each {head}")
            print(f"{'':>16}  LIST dirs {listed}")
            print(f"{'':>16}  default   {chosen}")


@contextmanager
def _given(endpoint: str) -> Iterator[str]:
    yield endpoint


if __name__ == "__main__":
    main()
