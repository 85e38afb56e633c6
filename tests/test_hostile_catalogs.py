"""Catalogs that break readers (docs/FORMAT.md, "Catalogs"): the gateway refuses each
with a 422 naming the problem and makes no revision; `repo-server check` finds each when
it is written straight into a repository; the client refuses what the gateway refuses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_format.catalog_writer import StoredCatalog, Subtree
from cvmfs_format.errors import CvmfsError
from repo_server.repository import LocalRepository
from tests.conftest import Repo, open_reader, read_tree, run_cli, serving_process
from tests.publish_api import Api, ObjectBag, commit_unchecked, make_token

TOP = "/sw/a"
FILE, DIR, LINK, FIFO = 0o100644, 0o040755, 0o120777, 0o010644


def row(name: object, mode: int = FILE, size: object = 3, digest: object = None, **kw: object):
    """An entries row below TOP (fields as in docs/FORMAT.md), overridable by keyword."""
    fields = {"parent": TOP, "target": None, "link_group": 0, "flags": 0, **kw}
    return (
        fields["parent"], name, mode, size, 0, digest, fields["target"], fields["link_group"],
        fields["flags"],
    )  # fmt: skip


def one_file(
    bag: ObjectBag, name: object = "f", size: object = 3, edit: str | None = None, **kw: object
) -> StoredCatalog:
    """TOP holding one file "abc" (and a 10-byte one, so the statistics stay counts)."""
    rows = [row(name, size=size, digest=bag.content(b"abc"), **kw)]
    rows.append(row("ten", size=10, digest=bag.content(b"0123456789")))
    return bag.catalog(TOP, rows, edit=edit)


def chunked(bag: ObjectBag, size: int, chunks: list[tuple[int, int, int]]) -> StoredCatalog:
    """A chunked file of `size` bytes from (offset, declared size, real size) chunks."""
    rows = [(f"{TOP}/big", off, declared, bag.content(bytes([off % 251]) * real))
            for off, declared, real in chunks]  # fmt: skip
    return bag.catalog(TOP, [row("big", size=size, flags=1)], chunks=rows)


def nested(
    bag: ObjectBag, *, size_delta: int = 0, child_root: str = f"{TOP}/sub", flagged: bool = True
) -> StoredCatalog:
    child = bag.catalog(
        child_root, [(child_root, "f", FILE, 3, 0, bag.content(b"abc"), None, 0, 0)]
    )
    entries = [row("sub", mode=DIR, size=0, flags=2 if flagged else 0)]
    ref = (f"{TOP}/sub", child.hash, child.size + size_delta, *child.stats.as_row())
    return bag.catalog(TOP, entries, nested=[ref])


BYTES = "WHERE key = 'bytes'"  # SQLite sums a text size as a float


@dataclass(frozen=True)
class Case:
    make: Callable[[ObjectBag], StoredCatalog]
    says: str  # what both the gateway's 422 and check's report contain
    reader_refuses: bool = True  # False: harmless to a reader, refused by the validators


CASES = {
    "name containing a slash": Case(lambda b: one_file(b, "x/y"), "contains '/'"),
    "name '..'": Case(lambda b: one_file(b, ".."), "'.' or '..'"),
    "name with a NUL": Case(lambda b: one_file(b, "a\0b"), "NUL"),
    "empty name": Case(lambda b: one_file(b, ""), "empty name"),
    "name over 255 bytes": Case(lambda b: one_file(b, "é" * 128), "255 bytes"),
    "negative size": Case(lambda b: one_file(b, size=-1), "negative size"),
    "size that is text": Case(
        lambda b: one_file(b, size="three", edit=f"UPDATE properties SET value = '10' {BYTES}"),
        "size 'three'",
    ),
    "size beyond the object": Case(lambda b: one_file(b, size=100), "100 bytes"),
    "unnormalised parent": Case(
        lambda b: one_file(b, parent=TOP + "/"), "not normalised", reader_refuses=False
    ),
    "parent outside the catalog": Case(
        lambda b: one_file(b, parent="/sw/b"), "outside /sw/a", reader_refuses=False
    ),
    "unknown flags": Case(lambda b: one_file(b, flags=8), "flags 8"),
    "negative link group": Case(lambda b: one_file(b, link_group=-2), "link group -2"),
    "a fifo": Case(
        lambda b: b.catalog(TOP, [row("p", mode=FIFO, size=0)]), "unsupported file type"
    ),
    "hash that is no object name": Case(
        lambda b: b.catalog(TOP, [row("f", digest="../../manifest")]), "not an object name"
    ),
    "symlink whose size is not its target's": Case(
        lambda b: b.catalog(TOP, [row("l", mode=LINK, size=5, target="abc")]), "target"
    ),
    "chunk gap": Case(lambda b: chunked(b, 600, [(0, 300, 300), (310, 290, 290)]), "gap"),
    "chunks short of the size": Case(lambda b: chunked(b, 900, [(0, 300, 300)]), "cover 300"),
    "chunk beyond its object": Case(
        lambda b: chunked(b, 600, [(0, 300, 300), (300, 300, 200)]), "300 bytes"
    ),
    "wrong nested catalog size": Case(lambda b: nested(b, size_delta=1), "stored size"),
    "nested catalog rooted elsewhere": Case(
        lambda b: nested(b, child_root=f"{TOP}/other"), "rooted at /sw/a/other"
    ),
    "nested row without its directory flag": Case(
        lambda b: nested(b, flagged=False), "not a directory flagged", reader_refuses=False
    ),
    "statistics that lie": Case(
        lambda b: one_file(b, edit="UPDATE properties SET value = '7' WHERE key = 'files'"),
        "statistics",
        reader_refuses=False,
    ),
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Repo, Api]]:
    """One server for every case: each must leave it as it found it."""
    tmp = tmp_path_factory.mktemp("gateway")
    LocalRepository.init(tmp / "repo", "test.example.org")
    repo = Repo(tmp / "repo", tmp / "repo.keys", "test.example.org")
    with serving_process(repo.dir, tmp / "serve.log") as (url, _):
        yield repo, Api(url, make_token(repo, "ci", "/sw"))


@pytest.mark.parametrize("name", CASES)
def test_the_gateway_refuses_a_catalog_that_breaks_readers(
    gateway: tuple[Repo, Api], name: str
) -> None:
    repo, api = gateway
    case = CASES[name]
    bag = ObjectBag()
    top = case.make(bag)

    lease = api.lease(TOP)
    assert api.upload(lease, bag.objects.items()).status_code == 200
    answer = api.commit(lease, top.hash)

    assert answer.status_code == 422, answer.text
    assert case.says in answer.json()["error"]
    assert repo.open().head().revision == 0
    api.drop(api.lease(TOP))  # the refused commit gave its path back at once


@pytest.mark.parametrize("name", CASES)
def test_check_finds_a_catalog_that_breaks_readers(tmp_path: Path, repo: Repo, name: str) -> None:
    case = CASES[name]
    bag = ObjectBag()
    top = case.make(bag)
    bag.store_into(repo)
    local = repo.open()
    with local.lock():
        commit_unchecked(local, Subtree(TOP, top, DIR, 0))  # as a broken publisher would

    result = run_cli("repo-server", "check", repo.dir, check=False)
    assert result.returncode == 1, result.stdout.decode()
    assert case.says in result.stdout.decode()
    if case.reader_refuses:
        with pytest.raises(CvmfsError):
            read_tree(open_reader(repo), TOP)


def test_a_valid_catalog_of_every_kind_passes_all_three(tmp_path: Path, repo: Repo) -> None:
    bag = ObjectBag()
    child_rows = [(f"{TOP}/sub", "f", FILE, 3, 0, bag.content(b"abc"), None, 0, 0)]
    child = bag.catalog(f"{TOP}/sub", child_rows)
    chunk_rows = [(f"{TOP}/big", 0, 300, bag.content(b"x" * 300)),
                  (f"{TOP}/big", 300, 300, bag.content(b"y" * 300))]  # fmt: skip
    rows = [
        row("f", digest=bag.content(b"abc"), link_group=1),
        row("g", digest=bag.content(b"abc"), link_group=1),
        row("big", size=600, flags=1),
        row("l", mode=LINK, size=len("é/x".encode()), target="é/x"),
        row("sub", mode=DIR, size=0, flags=2),
        row("é" * 127, size=0, digest=bag.content(b"")),
    ]
    ref = (f"{TOP}/sub", child.hash, child.size, *child.stats.as_row())
    top = bag.catalog(TOP, rows, chunks=chunk_rows, nested=[ref])

    with serving_process(repo.dir, tmp_path / "serve.log") as (url, _):
        api = Api(url, make_token(repo, "ci", "/sw"))
        lease = api.lease(TOP)
        assert api.upload(lease, bag.objects.items()).status_code == 200
        answer = api.commit(lease, top.hash)
        assert answer.status_code == 200, answer.text

    run_cli("repo-server", "check", repo.dir)
    tree = read_tree(open_reader(repo), TOP)
    assert tree["big"] == b"x" * 300 + b"y" * 300 and tree["sub/f"] == b"abc"


def test_a_revision_whose_root_catalog_is_rooted_elsewhere_is_refused_by_check_and_readers(
    repo: Repo,
) -> None:
    bag = ObjectBag()
    top = one_file(bag)
    bag.store_into(repo)
    local = repo.open()
    with local.lock():
        commit_unchecked(local, None, top)  # a broken rollback tool would do this

    result = run_cli("repo-server", "check", repo.dir, check=False)
    assert result.returncode == 1
    says = f"root catalog {top.hash} is rooted at {TOP}, not /"
    assert says in result.stdout.decode()
    listed = run_cli("cvmfs-client", "ls", repo.dir, "/", "--key", repo.pub, check=False)
    assert listed.returncode == 1 and says in listed.stderr.decode()
