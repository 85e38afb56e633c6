"""Repositories in an S3 bucket: the Storage protocol on a bucket and key prefix (boto3).

Keys mirror the directory layout (docs/FORMAT.md, "Layout"), so clients read the
repository straight from the bucket's HTTP endpoint as from any web server.
"""

from __future__ import annotations

import contextlib
import errno
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, EndpointConnectionError, NoCredentialsError
from botocore.exceptions import ClientError as BotoClientError

from cvmfs_format.objects import is_hash, object_path, verify_stored
from repo_server.errors import RepoError
from repo_server.http_caching import IMMUTABLE, SIGNED_DOCUMENT

SCHEME = "s3://"
# What a client (or a proxy between it and the bucket) may cache, as nginx is told in
# docs/OPERATING.md: objects forever, the two signed documents for a minute.
CONTENT_TYPE = "application/octet-stream"
# Requests in flight at once: S3 answers each in tens of milliseconds, so asking in
# parallel is what makes thousands of questions fast.
WORKERS = 32
# missing() lists a data/xx/ "directory" when asked about at least this many of its
# objects and HEADs each of them below that. One LIST page (1000 keys) costs about as
# much time as a few HEADs (see bench/s3_missing.py) and 12.5 times as much money, so
# listing pays off only when many objects of one directory are asked about at once.
LIST_FROM = 16
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HINTS = {
    "NoSuchBucket": "the bucket does not exist: create it first "
    '(docs/OPERATING.md, "Repositories on S3")',
    "AccessDenied": "access denied: the credentials need s3:ListBucket, s3:GetObject, "
    "s3:PutObject and s3:DeleteObject on the bucket",
    "InvalidAccessKeyId": "unknown access key: check AWS_ACCESS_KEY_ID or AWS_PROFILE",
    "SignatureDoesNotMatch": "wrong secret key: check AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
}


def is_s3_location(location: str) -> bool:
    return location.startswith(SCHEME)


def parse_location(location: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without a slash at either end)."""
    bucket, _, prefix = location[len(SCHEME) :].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.fullmatch(bucket) or "//" in prefix:
        raise RepoError(
            f"{location}: expected s3://BUCKET[/PREFIX] with a bucket name of 3-63 "
            "lower-case letters, digits, '.' and '-'"
        )
    return bucket, prefix


def _code(exc: BotoClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _not_found(exc: BotoClientError) -> bool:
    # A HEAD has no body, so S3 can only say "404"; a GET says NoSuchKey.
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


def make_client(endpoint_url: str | None = None) -> Any:
    """One S3 client for every thread: clients are thread-safe, sessions are not.

    boto3 is imported here so that commands on a local directory do not pay for it.
    Without endpoint_url, boto3 takes AWS_ENDPOINT_URL from the environment or AWS's own.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=WORKERS * 2,  # missing() may run in two publisher threads
        retries={"mode": "standard", "max_attempts": 5},
    )
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise RepoError(f"S3 client: {exc} (check --endpoint-url and the AWS_* settings)") from exc


class S3Storage:
    """A repository under s3://BUCKET/PREFIX/: the same keys as a directory's files."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None):
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = client if client is not None else make_client()
        # What this process has learnt about objects: a re-publish asks about the same
        # digests several times, and put_object need not HEAD what missing() reported.
        self._lock = threading.Lock()
        self._present: set[str] = set()
        self._absent: set[str] = set()

    @classmethod
    def from_location(cls, location: str, endpoint_url: str | None = None) -> S3Storage:
        bucket, prefix = parse_location(location)
        return cls(bucket, prefix, make_client(endpoint_url))

    @property
    def location(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, digest: str) -> str:
        return self.prefix + object_path(digest)

    def _digest_of(self, key: str) -> str | None:
        """The object a key names, or None for anything else under data/."""
        rest = key[len(self.prefix) :]
        digest = rest[5:7] + rest[8:]
        return digest if rest[7:8] == "/" and is_hash(digest) else None

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """S3's and boto3's errors as one-line RepoErrors saying what to do."""
        try:
            yield
        except BotoClientError as exc:
            code = _code(exc)
            hint = _HINTS.get(code, str(exc))
            raise RepoError(f"{SCHEME}{self.bucket}/{key}: {hint}") from exc
        except BotoCoreError as exc:  # no credentials, endpoint unreachable, timeouts
            if isinstance(exc, NoCredentialsError):
                hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            elif isinstance(exc, EndpointConnectionError):
                hint = "check --endpoint-url or AWS_ENDPOINT_URL"
            else:
                hint = "try again; check the endpoint and the network"
            raise RepoError(f"{SCHEME}{self.bucket}/{key}: {exc} ({hint})") from exc

    def _head(self, key: str) -> dict[str, Any] | None:
        with self._errors(key):
            try:
                return dict(self.client.head_object(Bucket=self.bucket, Key=key))
            except BotoClientError as exc:
                if _not_found(exc):
                    return None
                raise

    def _get(self, key: str) -> bytes | None:
        with self._errors(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except BotoClientError as exc:
                if _code(exc) == "NoSuchKey":
                    return None
                raise
            return bytes(response["Body"].read())

    def _put(self, key: str, data: bytes, cache_control: str) -> None:
        with self._errors(key):
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                CacheControl=cache_control,
                ContentType=CONTENT_TYPE,
            )

    def _list(self, prefix: str, start_after: str = "") -> Iterator[dict[str, Any]]:
        """The objects whose keys start with prefix, in key order from after start_after;
        each page of up to 1000 is requested only when the caller gets to it."""
        after = {"StartAfter": start_after} if start_after else {}
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, **after
            )
            for page in pages:
                yield from page.get("Contents", ())

    def is_empty(self) -> bool:
        """Nothing under the prefix yet (and the bucket exists): where init may write."""
        return next(self._list(self.prefix), None) is None

    # -- the Storage protocol ---------------------------------------------------------

    def has(self, digest: str) -> bool:
        return not self.missing([digest])

    def missing(self, digests: Iterable[str]) -> set[str]:
        with self._lock:
            unknown = set(digests) - self._present
        by_directory: dict[str, list[str]] = {}
        for digest in unknown:
            by_directory.setdefault(digest[:2], []).append(digest)
        found: set[str] = set()
        if by_directory:
            with ThreadPoolExecutor(min(WORKERS, len(by_directory))) as pool:
                for present in pool.map(self._present_in_directory, by_directory.values()):
                    found |= present
        absent = unknown - found
        with self._lock:
            self._present |= found
            self._absent |= absent
        return absent

    def _present_in_directory(self, digests: list[str]) -> set[str]:
        """Which of these digests (all in one data/xx/) are stored."""
        if len(digests) < LIST_FROM:
            return {d for d in digests if self._head(self._key(d)) is not None}
        wanted = sorted(digests)
        first, last = self._key(wanted[0]), self._key(wanted[-1])
        directory = first.rpartition("/")[0] + "/"
        found: set[str] = set()
        # Only the stretch of the listing between the lowest and highest digest asked
        # about: StartAfter a key just below the first, stop after the last.
        for item in self._list(directory, first[:-1]):
            digest = self._digest_of(item["Key"])
            if digest is not None:
                found.add(digest)
            if item["Key"] >= last:
                break
        return found & set(wanted)

    def put_object(self, digest: str, stored: bytes) -> bool:
        key = self._key(digest)
        with self._lock:
            if digest in self._present:
                return False
            reported_absent = digest in self._absent
        if not reported_absent and self._head(key) is not None:
            with self._lock:
                self._present.add(digest)
            return False
        verify_stored(stored, digest)  # never store bytes under a name they do not have
        self._put(key, stored, IMMUTABLE)
        with self._lock:
            self._present.add(digest)
            self._absent.discard(digest)
        return True

    def get_object(self, digest: str, max_bytes: int | None = None) -> bytes:
        data = self._get(self._key(digest))
        if data is None:
            # As a missing file is for a directory: check reports it as "missing".
            raise FileNotFoundError(errno.ENOENT, "no such object", self.url(digest))
        return data

    def object_head(self, digest: str, length: int) -> tuple[bytes, int]:
        key = self._key(digest)
        with self._errors(key):
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes=0-{max(length, 1) - 1}"
                )
            except BotoClientError as exc:
                if _code(exc) == "NoSuchKey":
                    raise FileNotFoundError(
                        errno.ENOENT, "no such object", self.url(digest)
                    ) from None
                if _code(exc) == "InvalidRange":  # an empty object has no byte 0
                    return b"", 0
                raise
            head = bytes(response["Body"].read())
        total = str(response.get("ContentRange", "")).rpartition("/")[2]
        return head[:length], int(total) if total.isdigit() else len(head)

    def url(self, digest: str) -> str:
        return f"{SCHEME}{self.bucket}/{self._key(digest)}"

    def iter_objects(self) -> Iterator[tuple[str, int]]:
        for item in self._list(self.prefix + "data/"):
            digest = self._digest_of(item["Key"])
            if digest is not None:
                yield digest, int(item["Size"])

    def delete_object(self, digest: str) -> None:
        key = self._key(digest)
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=key)
        with self._lock:
            self._present.discard(digest)

    def quarantine_object(self, digest: str) -> str:
        """Copy an object to quarantine/ under the prefix, then delete it from data/."""
        key = self._key(digest)
        target = f"{self.prefix}quarantine/{digest}"
        with self._errors(key):
            self.client.copy_object(
                Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": key}
            )
        self.delete_object(digest)
        return f"{SCHEME}{self.bucket}/{target}"

    def object_mtime(self, digest: str) -> float:
        head = self._head(self._key(digest))
        if head is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.url(digest))
        return float(head["LastModified"].timestamp())

    def read_file(self, name: str) -> bytes | None:
        return self._get(self.prefix + name)

    def write_file(self, name: str, data: bytes) -> None:
        # A PUT replaces the whole object at once: readers see the old or the new
        # manifest, never a mix, as after a rename in a directory.
        self._put(self.prefix + name, data, SIGNED_DOCUMENT)

    def sync(self) -> None:
        # Nothing to flush: S3 acknowledges a PUT only once the object is stored
        # durably, and reads after a write see it (strong consistency since 2020), so
        # every object put_object returned for is there before the manifest is written.
        pass

    def begin_writes(self) -> None:
        # A PUT never leaves a partial object behind, so a killed publish leaves only
        # complete, unreferenced objects: nothing to clean up (gc removes them).
        pass

    def end_writes(self) -> None:
        pass

    temporaries_removed = 0  # a PUT writes no temporary object

    def sweep_temporaries(self, older_than: float) -> tuple[int, int]:
        return 0, 0
