"""The publish API spoken by hand, as a hostile or broken publisher would: leases, packs
and commits with whatever the test crafted (tests/test_hostile_catalogs.py,
tests/test_gateway_faults.py)."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterable

import requests
import zstandard

from cvmfs_format.catalog_writer import CatalogBuilder, StoredCatalog, Subtree, graft
from cvmfs_format.objects import ObjectRef, content_hash, encode_object
from cvmfs_format.pack import API, encode_pack
from repo_server.loading import load_verified
from repo_server.repository import LocalRepository
from tests.conftest import Repo, run_cli

COMPRESSOR = zstandard.ZstdCompressor(level=3)


def commit_unchecked(
    local: LocalRepository, subtree: Subtree | None, root: StoredCatalog | None = None
) -> None:
    """Sign a revision with subtree grafted (or root as the whole tree) and none of the
    publish's checks or comparisons, as a broken publisher holding the key would
    (hold the lock)."""
    head = local.head()
    if root is None:
        assert subtree is not None
        root = graft(
            local.storage,
            functools.partial(load_verified, local.storage),
            ObjectRef.catalog(head.root_hash, head.root_size),
            subtree,
            COMPRESSOR,
            0,
        )
    path = "/" if subtree is None else subtree.path
    local.publish_root(head, root.hash, root.size, path, "", None, COMPRESSOR, time.time())


def make_token(repo: Repo, name: str, path: str) -> str:
    result = run_cli("repo-server", "token", "add", repo.dir, "--name", name, "--path", path)
    return result.stdout.decode().strip()


class Api:
    """One token's requests to a repo-server's publish API; answers are returned as
    they come, for the test to judge."""

    def __init__(self, url: str, token: str):
        self.base = f"{url}{API}"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return self.session.post(f"{self.base}{path}", timeout=120, **kwargs)  # type: ignore[arg-type]

    def open_lease(self, path: str) -> requests.Response:
        return self.post("/leases", json={"path": path})

    def lease(self, path: str) -> str:
        answer = self.open_lease(path)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["lease"])

    def drop(self, lease: str) -> None:
        answer = self.session.delete(f"{self.base}/leases/{lease}", timeout=30)
        assert answer.status_code == 204, answer.text

    def upload(self, lease: str, objects: Iterable[tuple[str, bytes]]) -> requests.Response:
        return self.post(f"/leases/{lease}/objects", data=encode_pack(objects))

    def commit(self, lease: str, catalog: str, **fields: object) -> requests.Response:
        body = {"catalog": catalog, "mode": 0o40755, "mtime_ns": 0, **fields}
        return self.post(f"/leases/{lease}/commit", json=body)


class ObjectBag:
    """Objects a test crafts (content and catalogs), kept until uploaded or stored: the
    ObjectSink a CatalogBuilder finishes into."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def has(self, digest: str) -> bool:
        return digest in self.objects

    def missing(self, digests: Iterable[str]) -> set[str]:
        return {d for d in digests if d not in self.objects}

    def put_object(self, digest: str, stored: bytes) -> bool:
        new = digest not in self.objects
        self.objects[digest] = stored
        return new

    def content(self, data: bytes) -> str:
        digest = content_hash(data)
        self.objects[digest] = encode_object(data, COMPRESSOR)
        return digest

    def catalog(
        self,
        root: str,
        rows: list[tuple[object, ...]],
        chunks: list[tuple[object, ...]] = [],  # noqa: B006 (never mutated)
        nested: list[tuple[object, ...]] = [],  # noqa: B006
        edit: str | None = None,
    ) -> StoredCatalog:
        """A catalog rooted at root with these rows, as CatalogBuilder writes it; `edit`
        is SQL run on the finished database (to make it lie about itself)."""
        builder = CatalogBuilder(root)
        builder.add_entries(rows)  # type: ignore[arg-type]
        builder.add_chunks(chunks)  # type: ignore[arg-type]
        for row in nested:
            builder.db.execute("INSERT INTO nested VALUES (?,?,?,?,?,?,?,?)", row)
        stored = builder.finish(self, COMPRESSOR)
        if edit is None:
            return stored
        db = sqlite3.connect(":memory:")
        db.deserialize(zstandard.ZstdDecompressor().decompress(self.objects.pop(stored.hash)))
        db.executescript(edit)
        data = db.serialize()
        digest = content_hash(data)
        self.objects[digest] = encode_object(data, COMPRESSOR)
        return StoredCatalog(digest, len(self.objects[digest]), stored.stats, 0)

    def store_into(self, repo: Repo) -> None:
        storage = repo.open().storage
        for digest, stored in self.objects.items():
            storage.put_object(digest, stored)
