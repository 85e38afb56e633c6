"""Where uploaded outputs and manager-served inputs are kept: a local directory or an S3
bucket, behind one small interface.

An upload is first written to a staging file while its SHA-256 is computed; only after
the hash and length are checked is it committed under its key, atomically (a rename on
disk; one PUT on S3), so a cut or wrong upload stores nothing. Keys:
jobs/ID/LEASE/NAME (each attempt its own, so a late agent can never overwrite the bytes
of the attempt that finished the job) and inputs/SHA256.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cvmfs_format.durable import sync_directory, temporary_name, writer_is_gone

CHUNK = 1 << 20


class OutputStore(Protocol):
    def staging(self) -> BinaryIO:
        """A new named temporary file to write an upload into."""

    def commit(self, staged: str, key: str) -> None:
        """Make the staged file the content of key, atomically; the staged file is gone."""

    def exists(self, key: str) -> bool: ...

    def read(self, key: str) -> Iterator[bytes] | None:
        """The content of key in chunks, or None if it is not stored."""

    def delete(self, key: str) -> None: ...

    def listing(self, prefix: str) -> Iterator[Stored]:
        """Every key under prefix ("jobs/", "inputs/"), staging files excluded."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    modified: float  # seconds since the epoch


def discard(staged: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staged)


class LocalStore:
    """Keys are paths under root; staging files live in root/.incoming (same file system,
    so committing is a rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():  # cut off when their manager died
            if writer_is_gone(leftover.name):
                discard(str(leftover))

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def staging(self) -> BinaryIO:
        return open(self.incoming / temporary_name(), "xb")  # noqa: SIM115 (the caller's)

    def commit(self, staged: str, key: str) -> None:
        target = self._path(key)
        try:
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        finally:
            discard(staged)
        sync_directory(target.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read(self, key: str) -> Iterator[bytes] | None:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 (closed by the generator)
        except FileNotFoundError:
            return None

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(CHUNK):
                    yield block

        return chunks()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def listing(self, prefix: str) -> Iterator[Stored]:
        top = self._path(prefix)
        for directory, _, files in os.walk(top):
            for name in files:
                path = Path(directory, name)
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    st = path.stat()
                    yield Stored(str(path.relative_to(self.root)), st.st_size, st.st_mtime)


class S3Store:
    """Keys under s3://BUCKET/PREFIX/; staging files in the system's temporary directory."""

    def __init__(self, location: str, endpoint_url: str | None = None):
        from repo_server.s3_storage import make_client, parse_location

        self.bucket, prefix = parse_location(location)
        self.prefix = f"{prefix}/" if prefix else ""
        self.client: Any = make_client(endpoint_url)
        self.location = location

    def describe(self) -> str:
        return self.location

    def staging(self) -> BinaryIO:
        fd, name = tempfile.mkstemp(prefix="copilot-upload-")
        os.close(fd)
        return open(name, "wb")  # noqa: SIM115 (the caller's)

    def commit(self, staged: str, key: str) -> None:
        try:
            # One PUT (multipart above 8 MiB, completed only when all parts arrived):
            # readers see the whole object or none.
            self.client.upload_file(staged, self.bucket, self.prefix + key)
        finally:
            discard(staged)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError:
            return False
        return True

    def read(self, key: str) -> Iterator[bytes] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return iter(lambda: bytes(body.read(CHUNK)), b"")

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def listing(self, prefix: str) -> Iterator[Stored]:
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) :]
                yield Stored(key, int(item["Size"]), item["LastModified"].timestamp())


def open_store(location: str, endpoint_url: str | None = None) -> OutputStore:
    if location.startswith("s3://"):
        return S3Store(location, endpoint_url)
    return LocalStore(Path(location))


def output_key(job_id: str, lease: str, name: str) -> str:
    return f"jobs/{job_id}/{lease}/{name}"


def input_key(sha256: str) -> str:
    return f"inputs/{sha256}"
