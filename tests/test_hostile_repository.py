"""Property tests against a hostile HTTP server: whatever it does to the files of a
genuine repository (flip, cut, lengthen, swap, replay, refuse, send without end), a
client returns the right bytes or an error, never wrong bytes with success.

The repository holds small files, a chunked file and nested catalogs, so the mutations
reach the whitelist, the manifest, the history, root and nested catalogs, whole-file
objects and chunks. The client is the library reader on the real pycurl fetcher.
"""

from __future__ import annotations

import contextlib
import http.server
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cvmfs_client.fetcher import CurlFetcher, DirectoryFetcher
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.catalog import ENTRY_COLUMNS, Catalog, Entry
from cvmfs_format.catalog_writer import StoredCatalog, Subtree
from cvmfs_format.errors import CvmfsError
from cvmfs_format.objects import ObjectRef, content_hash, decode_object, encode_object, object_path
from cvmfs_format.signed import load_public_key_pem
from cvmfs_format.trust import TrustedState
from repo_server.check import check
from repo_server.loading import load_catalog, load_verified
from repo_server.repository import LocalRepository
from tests.conftest import Tree, run_cli
from tests.publish_api import commit_unchecked

MiB = 1 << 20
NAME = "hostile.example.org"

# What the server does to the one file it attacks.
Mutation = Callable[[bytes], bytes | None]  # None: answer 404


@dataclass
class Attack:
    target: str = ""  # relative path of the attacked file ("" for none)
    mutate: Mutation | None = None
    endless: bool = False
    served: list[str] = field(default_factory=list)


class HostileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, spare: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.spare = spare  # an older copy of the repository, for replays and swaps
        self.attack = Attack()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: HostileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        relpath = self.path.lstrip("/")
        attack = self.server.attack
        try:
            data = (self.server.root / relpath).read_bytes()
        except OSError:
            data = None
        if relpath == attack.target:
            attack.served.append(relpath)
            if attack.endless:
                self._endless()
                return
            assert attack.mutate is not None
            data = attack.mutate(data) if data is not None else None
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def _endless(self) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            while True:
                self.wfile.write(b"\0" * 65536)


@dataclass
class Published:
    repo: LocalRepository
    pub: Path
    truth: Tree  # path in the repository -> content
    old_truth: Tree  # the same in revision 1, whose manifest the server may replay
    files: list[str]  # the repository's own files a client may fetch
    server: HostileServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def write_tree(root: Path, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    tree = {
        "bin/run.sh": b"#!/bin/sh\necho analysis\n",
        "data/calib.bin": rng.randbytes(6 * MiB),  # cut into chunks
        "lib/.cvmfscatalog": b"",  # a nested catalog
        "lib/pkg/__init__.py": b"ANSWER = 42\n" * 30,
        "lib/pkg/raw.bin": rng.randbytes(2000),  # stored raw
        "share/doc.txt": b"how to run it\n" * 100,
    }
    for relpath, content in tree.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return tree


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    work = tmp_path_factory.mktemp("hostile")
    repo_dir, keys = work / "repo", work / "repo.keys"
    LocalRepository.init(repo_dir, NAME, keys)
    env = {"CVMBUILD_CACHE_DIR": str(work / "statcache")}
    old_tree = write_tree(work / "old", seed=1)
    run_cli("cvmbuild", "publish", work / "old", "--repo", repo_dir, "--path", "/sw", env=env)
    spare = work / "spare"  # revision 1 as it was: the replay material
    spare.mkdir()
    for name in ("manifest", "whitelist"):
        (spare / name).write_bytes((repo_dir / name).read_bytes())
    tree = write_tree(work / "src", seed=2)
    tree["bin/run.sh"] = b"#!/bin/sh\necho analysis 2\n"
    (work / "src" / "bin" / "run.sh").write_bytes(tree["bin/run.sh"])
    run_cli("cvmbuild", "publish", work / "src", "--repo", repo_dir, "--path", "/sw", env=env)
    repo = LocalRepository(repo_dir, keys)
    files = ["whitelist", "manifest"] + [object_path(d) for d, _ in repo.storage.iter_objects()]
    server = HostileServer(repo_dir, spare)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Published(
            repo,
            keys / f"{NAME}.pub",
            {f"/sw/{k}": v for k, v in tree.items()},
            {f"/sw/{k}": v for k, v in old_tree.items()},
            files,
            server,
        )
    finally:
        server.shutdown()


def read_everything(published: Published) -> dict[str, bytes | CvmfsError]:
    """Every file of the tree through a fresh client: its bytes, or the error it gave."""
    key = load_public_key_pem(published.pub.read_bytes(), str(published.pub))
    reader = RepositoryReader(CurlFetcher([published.url]), TrustedState(key, NAME))
    outcome: dict[str, bytes | CvmfsError] = {}
    for path in published.truth:
        try:
            outcome[path] = b"".join(reader.iter_content(reader.lookup(path)))
        except CvmfsError as exc:
            outcome[path] = exc
    return outcome


def flip(position: int) -> Mutation:
    def mutate(data: bytes) -> bytes:
        if not data:
            return b"\x01"
        i = position % len(data)
        return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]

    return mutate


MUTATIONS: dict[str, Callable[[int, Published], Mutation]] = {
    "flip a byte": lambda n, p: flip(n),
    "cut short": lambda n, p: lambda d: d[: n % max(len(d), 1)],
    "lengthen": lambda n, p: lambda d: d + bytes([n % 256]) * (1 + n % 97),
    "refuse (404)": lambda n, p: lambda d: None,
    "empty": lambda n, p: lambda d: b"",
    "swap for another file": lambda n, p: (
        lambda d: (p.server.root / p.files[n % len(p.files)]).read_bytes()
    ),
    "replay the old one": lambda n, p: (
        lambda d: (
            (p.server.spare / p.server.attack.target).read_bytes()
            if (p.server.spare / p.server.attack.target).exists()
            else d
        )
    ),
}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    target=st.integers(min_value=0),
    mutation=st.sampled_from(sorted(MUTATIONS) + ["send without end"]),
    where=st.integers(min_value=0, max_value=2**20),
)
@example(target=1, mutation="replay the old one", where=0)  # files[1]: the manifest
def test_a_hostile_server_gets_the_right_bytes_or_an_error_never_wrong_bytes(
    published: Published, target: int, mutation: str, where: int
) -> None:
    attack = Attack(target=published.files[target % len(published.files)])
    if mutation == "send without end":
        attack.endless = True
    else:
        attack.mutate = MUTATIONS[mutation](where, published)
    published.server.attack = attack
    try:
        outcome = read_everything(published)
    finally:
        published.server.attack = Attack()
    # A client that has seen no newer revision cannot tell a replayed, still valid
    # manifest from the newest: it reads revision 1, whole and right (the revision floor,
    # test_trust, is what stops a replay to a client that has seen revision 2).
    replayed = mutation == "replay the old one" and attack.target == "manifest"
    for path, result in outcome.items():
        if not isinstance(result, CvmfsError):
            right = [published.truth[path]] + ([published.old_truth[path]] if replayed else [])
            assert result in right, (
                f"{mutation} of {attack.target}: {path} read back wrong bytes with success"
            )


def test_the_hostile_server_is_harmless_when_it_attacks_nothing(published: Published) -> None:
    """The property above would hold trivially if nothing could be read: without an
    attack every file reads back right."""
    assert read_everything(published) == published.truth


# -- a hostile publisher: validly signed catalogs with damaged rows ---------------------

ROW_MUTATIONS: dict[str, Callable[[list[list[object]], int, int], None]] = {
    # (rows of one table, which row, a number to vary the mutation by)
    "size": lambda rows, i, n: rows[i].__setitem__(3, n % 9000 - 1000),
    "name": lambda rows, i, n: rows[i].__setitem__(1, ["a/b", "", ".", "..", "x\0y"][n % 5]),
    "mode": lambda rows, i, n: rows[i].__setitem__(
        2, [0o010644, 0o140644, 0o120777, 0o40755, -1][n % 5]
    ),
    "hash": lambda rows, i, n: rows[i].__setitem__(5, [None, "00" * 32, "xyz"][n % 3]),
    "flags": lambda rows, i, n: rows[i].__setitem__(8, n % 8),
    "parent": lambda rows, i, n: rows[i].__setitem__(0, ["/", "/elsewhere", "sw", "/sw/"][n % 4]),
    "target": lambda rows, i, n: rows[i].__setitem__(6, ["x" * (n % 7), None][n % 2]),
}
CHUNK_MUTATIONS: dict[str, Callable[[list[list[object]], int, int], None]] = {
    "offset": lambda rows, i, n: rows[i].__setitem__(1, int(rows[i][1]) + n % 5000 - 2500),  # type: ignore[call-overload]
    "chunk size": lambda rows, i, n: rows[i].__setitem__(2, int(rows[i][2]) + n % 5000 - 2500),  # type: ignore[call-overload]
    "drop": lambda rows, i, n: rows.pop(i),
    "duplicate": lambda rows, i, n: rows.append([*rows[i][:1], int(rows[i][1]) + 1, *rows[i][2:]]),  # type: ignore[call-overload]
    "chunk hash": lambda rows, i, n: rows[i].__setitem__(3, rows[(i + 1) % len(rows)][3]),
}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    table=st.sampled_from(["entries", "chunks"]),
    mutation=st.integers(min_value=0),
    row=st.integers(min_value=0),
    n=st.integers(min_value=0, max_value=2**20),
)
def test_a_signed_catalog_with_damaged_rows_never_reads_back_wrong_bytes(
    tmp_path_factory: pytest.TempPathFactory, table: str, mutation: int, row: int, n: int
) -> None:
    """A publisher with the signing key (or a gateway that let a bad catalog through)
    signs a catalog with a damaged row. A reader returns, for every file, either an
    error or exactly the bytes the objects its entry names hold; and whatever `check`
    finds no fault in reads back whole."""
    work = tmp_path_factory.mktemp("signed")
    repo = LocalRepository.init(work / "repo", NAME, work / "repo.keys")
    src = work / "src"
    tree = write_tree(src, seed=3)
    run_cli(
        "cvmbuild", "publish", src, "--repo", repo.root, "--path", "/sw",
        env={"CVMBUILD_CACHE_DIR": str(work / "statcache")},
    )  # fmt: skip
    mutations = ROW_MUTATIONS if table == "entries" else CHUNK_MUTATIONS
    name = sorted(mutations)[mutation % len(mutations)]
    publish_damaged(repo, table, lambda rows: mutations[name](rows, row % len(rows), n))

    key = load_public_key_pem((work / "repo.keys" / f"{NAME}.pub").read_bytes(), "pub")
    reader = RepositoryReader(DirectoryFetcher(str(repo.root)), TrustedState(key, NAME))
    read: dict[str, bytes | CvmfsError] = {}
    for relpath in tree:
        path = f"/sw/{relpath}"
        try:
            entry = reader.lookup(path)
            if entry.is_file:
                content = b"".join(reader.iter_content(entry))
                assert len(content) == entry.size, f"{name}: {path} read short or long"
                assert content == named_content(repo, reader, entry), f"{name}: {path}"
                read[path] = content
        except CvmfsError as exc:
            read[path] = exc
    if not check(repo).problems:
        failed = {p: r for p, r in read.items() if isinstance(r, CvmfsError)}
        assert not failed, f"{name}: check is green but the reader refused {failed}"


def publish_damaged(
    repo: LocalRepository, table: str, damage: Callable[[list[list[object]]], None]
) -> None:
    """Rewrite the catalog at /sw with one table's rows damaged, and sign a revision
    with it (straight into the repository, as a publisher holding the key could)."""
    head = repo.head()
    root = load_catalog(repo.storage, ObjectRef.catalog(head.root_hash, head.root_size))
    ref = root.nested["/sw"]
    content = load_verified(repo.storage, ObjectRef.catalog(ref.hash, ref.size))
    root.close()
    db = sqlite3.connect(":memory:")
    db.deserialize(content)
    columns = {"entries": ENTRY_COLUMNS, "chunks": "path, offset, size, hash"}[table]
    rows = [list(r) for r in db.execute(f"SELECT {columns} FROM {table}")]
    damage(rows)
    db.execute(f"DELETE FROM {table}")
    marks = ",".join("?" * len(columns.split(",")))
    with contextlib.suppress(sqlite3.IntegrityError):  # a damage SQLite itself refuses
        db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
    db.commit()
    new = db.serialize()
    digest = content_hash(new)
    stored = encode_object(new, zstandard.ZstdCompressor())
    repo.storage.put_object(digest, stored)
    stats = Catalog.from_bytes(new, digest).stats()
    with repo.lock():
        commit_unchecked(
            repo, Subtree("/sw", StoredCatalog(digest, len(stored), stats, 0), 0o40755, 0)
        )


def named_content(repo: LocalRepository, reader: RepositoryReader, entry: Entry) -> bytes:
    """The bytes of the objects an entry names, read straight from storage."""
    if not entry.chunked:
        assert entry.hash is not None
        return decode_object(repo.storage.get_object(entry.hash), entry.hash)
    return b"".join(
        decode_object(repo.storage.get_object(c.hash), c.hash) for c in reader.chunks(entry)
    )
