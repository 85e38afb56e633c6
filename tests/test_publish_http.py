"""`cvmbuild publish --repo http://...`: the publish API of `repo-server serve`, with
tokens scoped to paths, leases, verified uploads, and crash safety on both sides."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import zstandard

from cvmfs_format.catalog_writer import CatalogBuilder
from cvmfs_format.pack import API, PACK_LIMIT, encode_pack
from repo_server.leases import Leases
from repo_server.tokens import Token
from tests.conftest import (
    BIN,
    MiB,
    Repo,
    open_reader,
    read_tree,
    run_cli,
    serving_process,
    write_build_tree,
)

BLOBS = 40
LEASE_TTL = "3"  # seconds: a killed publisher's lease runs out within a test


@pytest.fixture
def server(repo: Repo, tmp_path: Path) -> Iterator[str]:
    with serving_process(repo.dir, tmp_path / "serve.log", "--lease-ttl", LEASE_TTL) as (url, _):
        yield url


def make_token(repo: Repo, name: str, path: str) -> str:
    result = run_cli("repo-server", "token", "add", repo.dir, "--name", name, "--path", path)
    return result.stdout.decode().strip()


def token_file(tmp_path: Path, token: str, name: str = "token") -> Path:
    path = tmp_path / name
    path.write_text(token + "\n")
    return path


def publish_http(
    src: Path, url: str, prefix: str, token: Path | None, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    args = ["cvmbuild", "publish", src, "--repo", url, "--path", prefix, *extra]
    if token is not None:
        args += ["--token-file", token]
    return run_cli(*args, check=check)


def head_revision(repo: Repo) -> int:
    return repo.open().head().revision


def object_count(repo: Repo) -> int:
    return sum(1 for _ in repo.open().storage.iter_objects())


def test_a_tree_published_over_http_reads_back_exactly(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    tree = write_build_tree(tmp_path / "src", seed=1, small_files=300, big_files=2)
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))

    out = publish_http(tmp_path / "src", server, "/sw/1.0", token, "--tag", "v1.0").stdout
    assert b"published revision 1 at /sw/1.0" in out

    assert read_tree(open_reader(repo), "/sw/1.0") == tree
    assert [t.name for t in repo.open().history(repo.open().head()).tags()] == ["v1.0"]
    run_cli("repo-server", "check", repo.dir)


def test_publishing_again_over_http_uploads_nothing(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    write_build_tree(tmp_path / "src", seed=2, small_files=200, big_files=1)
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))
    publish_http(tmp_path / "src", server, "/sw/1.0", token)

    out = publish_http(tmp_path / "src", server, "/sw/1.0", token).stdout.decode()
    assert "(0 objects, 0 catalogs)" in out
    objects = object_count(repo)
    # Without the stat cache the publisher hashes everything, asks, and still sends nothing.
    out = run_cli(
        "cvmbuild", "publish", tmp_path / "src", "--repo", server, "--path", "/sw/2.0",
        "--token-file", token, env={"CVMBUILD_CACHE_DIR": str(tmp_path / "fresh-cache")},
    ).stdout.decode()  # fmt: skip
    written = re.search(r"\(0 objects, (\d+) catalogs\)", out)
    assert written, out  # catalogs rooted at /sw/2.0 are new; no content is
    assert object_count(repo) == objects + int(written[1]) + 2  # and a root catalog, history


def test_a_token_publishes_only_under_its_path(tmp_path: Path, repo: Repo, server: str) -> None:
    write_build_tree(tmp_path / "src", seed=3, small_files=10, big_files=0)
    token = token_file(tmp_path, make_token(repo, "atlas", "/sw/atlas"))
    objects = object_count(repo)

    for prefix in ("/sw/cms", "/sw", "/", "/sw/atlasx"):
        result = publish_http(tmp_path / "src", server, prefix, token, check=False)
        assert result.returncode == 1
        assert b"may publish only under /sw/atlas" in result.stderr

    assert head_revision(repo) == 0
    assert object_count(repo) == objects
    publish_http(tmp_path / "src", server, "/sw/atlas/1.0", token)
    assert head_revision(repo) == 1


def test_missing_unknown_or_revoked_tokens_change_nothing(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    write_build_tree(tmp_path / "src", seed=4, small_files=10, big_files=0)
    good = make_token(repo, "ci", "/")
    run_cli("repo-server", "token", "revoke", repo.dir, "--name", "ci")

    no_token = publish_http(tmp_path / "src", server, "/sw", None, check=False)
    assert no_token.returncode == 1 and b"needs a token" in no_token.stderr
    for token in ("cvmt_not-a-real-token", good):
        result = publish_http(
            tmp_path / "src", server, "/sw", token_file(tmp_path, token), check=False
        )
        assert result.returncode == 1
        assert b"token not known to this server" in result.stderr
    assert head_revision(repo) == 0
    listing = run_cli("repo-server", "token", "list", repo.dir).stdout
    assert listing == b""
    # The API itself answers 401 without a token, for every endpoint.
    assert (
        requests.post(f"{server}{API}/leases", json={"path": "/sw"}, timeout=5).status_code == 401
    )
    assert requests.post(f"{server}{API}/objects/missing", json={}, timeout=5).status_code == 401


def test_publishers_on_disjoint_paths_both_land(tmp_path: Path, repo: Repo, server: str) -> None:
    trees = {
        name: write_build_tree(tmp_path / name, seed=10 + i, small_files=400, big_files=1)
        for i, name in enumerate(("a", "b"))
    }
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))
    procs = [
        subprocess.Popen(
            [
                str(BIN / "cvmbuild"),
                "publish",
                str(tmp_path / name),
                "--repo",
                server,
                "--path",
                f"/sw/{name}",
                "--token-file",
                str(token),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name in trees
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        assert b"waiting" not in err  # disjoint: neither waited for the other's lease

    assert head_revision(repo) == 2
    reader = open_reader(repo)
    for name, tree in trees.items():
        assert read_tree(reader, f"/sw/{name}") == tree
    run_cli("repo-server", "check", repo.dir)


def test_an_overlapping_publisher_waits_for_the_lease(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    tree = write_build_tree(tmp_path / "src", seed=5, small_files=20, big_files=0)
    secret = make_token(repo, "ci", "/sw")
    auth = {"Authorization": f"Bearer {secret}"}
    held = requests.post(f"{server}{API}/leases", json={"path": "/sw"}, headers=auth, timeout=5)
    assert held.status_code == 201
    proc = subprocess.Popen(
        [str(BIN / "cvmbuild"), "publish", str(tmp_path / "src"), "--repo", server,
         "--path", "/sw/1.0", "--token-file", str(token_file(tmp_path, secret))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(2)
    assert proc.poll() is None, proc.communicate()
    assert head_revision(repo) == 0

    lease = held.json()["lease"]
    assert requests.delete(f"{server}{API}/leases/{lease}", headers=auth, timeout=5).ok
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"/sw is being published by 'ci'; waiting" in err
    assert read_tree(open_reader(repo), "/sw/1.0") == tree


def _lease(server: str, secret: str, path: str) -> str:
    answer = requests.post(
        f"{server}{API}/leases", json={"path": path}, headers={"Authorization": f"Bearer {secret}"},
        timeout=5,
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    return str(answer.json()["lease"])


def test_hostile_requests_are_refused_and_change_nothing(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    secret = make_token(repo, "ci", "/sw")
    auth = {"Authorization": f"Bearer {secret}"}
    objects = object_count(repo)

    for path in ("/sw/../etc", "sw/relative", "/sw/a\0b", "/sw/" + "x" * 300, "/sw/./a"):
        answer = requests.post(
            f"{server}{API}/leases", json={"path": path}, headers=auth, timeout=5
        )
        assert answer.status_code == 400, (path, answer.text)

    lease = _lease(server, secret, "/sw/a")
    upload = f"{server}{API}/leases/{lease}/objects"
    wrong = encode_pack([("0" * 64, b"content whose hash is not zeros")])
    answer = requests.post(upload, data=wrong, headers=auth, timeout=5)
    assert answer.status_code == 422 and "hashes to" in answer.json()["error"]
    truncated = encode_pack([("0" * 64, b"x" * 100)])[:-10]
    assert requests.post(upload, data=truncated, headers=auth, timeout=5).status_code == 400
    assert requests.post(upload, data=b"not a pack", headers=auth, timeout=5).status_code == 400
    assert object_count(repo) == objects

    # A catalog rooted elsewhere than the lease is refused at commit.
    builder = CatalogBuilder("/other")
    builder.add_entries([("/other", "f", 0o100644, 0, 0, "0" * 64, None, 0, 0)])
    sink = repo.open().storage
    outside = builder.finish(sink, zstandard.ZstdCompressor())
    commit = f"{server}{API}/leases/{lease}/commit"
    body = {"catalog": outside.hash, "mode": 0o40755, "mtime_ns": 0}
    answer = requests.post(commit, json=body, headers=auth, timeout=5)
    assert answer.status_code == 422 and "rooted at /other" in answer.json()["error"]

    # A catalog at the right place that names content nobody uploaded is refused too.
    lease = _lease(server, secret, "/sw/a")
    builder = CatalogBuilder("/sw/a")
    builder.add_entries([("/sw/a", "f", 0o100644, 5, 0, "ab" * 32, None, 0, 0)])
    dangling = builder.finish(sink, zstandard.ZstdCompressor())
    body = {"catalog": dangling.hash, "mode": 0o40755, "mtime_ns": 0}
    answer = requests.post(
        f"{server}{API}/leases/{lease}/commit", json=body, headers=auth, timeout=5
    )
    assert answer.status_code == 422 and "not stored" in answer.json()["error"]
    assert head_revision(repo) == 0
    run_cli("repo-server", "check", repo.dir)


def test_a_publisher_killed_mid_upload_leaves_no_revision_and_resumes(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # Incompressible, and more than the publisher may have in flight (8 packs of about
    # 8 MiB), so a kill right after the first object lands is always mid-upload.
    for i in range(BLOBS):
        (src / f"blob{i}").write_bytes(os.urandom(3 * MiB))
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))
    before = object_count(repo)
    proc = subprocess.Popen(
        [str(BIN / "cvmbuild"), "publish", str(src), "--repo", server, "--path", "/sw/big",
         "--token-file", str(token)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while object_count(repo) == before and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # packs the server had already received are still being stored
    assert head_revision(repo) == 0
    arrived = object_count(repo) - before
    assert 0 < arrived < BLOBS, "the kill should land mid-upload"
    run_cli("repo-server", "check", repo.dir)

    # The dead publisher's lease runs out (--lease-ttl), then only the rest is sent.
    result = publish_http(src, server, "/sw/big", token)
    assert f"({BLOBS - arrived} objects," in result.stdout.decode()
    assert read_tree(open_reader(repo), "/sw/big") == {
        p.name: p.read_bytes() for p in src.iterdir()
    }


def test_a_server_killed_mid_publish_keeps_the_previous_revision(
    tmp_path: Path, repo: Repo
) -> None:
    first = write_build_tree(tmp_path / "v1", seed=6, small_files=30, big_files=0)
    src = tmp_path / "v2"
    src.mkdir()
    for i in range(12):
        (src / f"blob{i}").write_bytes(os.urandom(3 * MiB))
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))
    with serving_process(repo.dir, tmp_path / "serve1.log") as (url, server):
        publish_http(tmp_path / "v1", url, "/sw/1", token)
        before = object_count(repo)
        proc = subprocess.Popen(
            [str(BIN / "cvmbuild"), "publish", str(src), "--repo", url, "--path", "/sw/2",
             "--token-file", str(token)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        while object_count(repo) == before and proc.poll() is None:
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)
        server.wait()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert b"error:" in err
    assert head_revision(repo) == 1
    assert read_tree(open_reader(repo), "/sw/1") == first
    run_cli("repo-server", "check", repo.dir)

    with serving_process(repo.dir, tmp_path / "serve2.log") as (url, _):
        publish_http(src, url, "/sw/2", token)
    assert head_revision(repo) == 2


def test_a_lease_nobody_renews_expires() -> None:
    now = [0.0]
    leases = Leases(ttl=300, clock=lambda: now[0])
    alice = Token("alice", "/sw", "x", 0)
    held = leases.acquire(alice, "/sw/a")
    with pytest.raises(Exception, match="being published by 'alice'"):
        leases.acquire(alice, "/sw/a/b")
    leases.acquire(alice, "/sw/b")  # disjoint: fine
    now[0] = 200.0
    leases.use(held.id, alice)  # used: good for another 300 s
    now[0] = 450.0
    with pytest.raises(Exception, match="being published"):
        leases.acquire(alice, "/sw")
    now[0] = 501.0
    leases.acquire(alice, "/sw/a")  # the holder went silent: the lease is free again


def test_a_dry_run_shows_what_would_be_uploaded_and_changes_nothing(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    write_build_tree(tmp_path / "src", seed=8, small_files=120, big_files=1)
    token = token_file(tmp_path, make_token(repo, "ci", "/sw"))
    objects = object_count(repo)

    for location in (server, str(repo.dir)):
        out = publish_http(tmp_path / "src", location, "/sw/1.0", token, "--dry-run").stdout
        assert out.startswith(b"dry run, nothing changed: publishing "), out
        assert re.search(rb"\(\d{3} objects, [1-9] catalogs\)", out), out
    assert head_revision(repo) == 0
    assert object_count(repo) == objects

    real = publish_http(tmp_path / "src", server, "/sw/1.0", token).stdout.decode()
    counts = re.search(r"\(\d+ objects, \d+ catalogs\)", real)
    assert counts and counts[0] in out.decode()  # the dry run predicted the upload
    again = publish_http(tmp_path / "src", server, "/sw/1.0", token, "--dry-run").stdout
    assert b"(0 objects, 0 catalogs)" in again


def test_token_mistakes_get_one_line_errors_and_change_nothing(tmp_path: Path, repo: Repo) -> None:
    make_token(repo, "ci", "/sw")
    tokens = repo.keys / "tokens.json"
    before = tokens.read_bytes()
    for args, complaint in (
        (["add", "--name", "ci", "--path", "/sw"], b"token 'ci' exists"),
        (["add", "--name", "bad name", "--path", "/sw"], b"token name 'bad name'"),
        (["add", "--name", "x", "--path", "sw/relative"], b"must be absolute"),
        (["add", "--name", "x", "--path", "/sw/../etc"], b"'.' or '..'"),
        (["revoke", "--name", "nobody"], b"no token named 'nobody'"),
    ):
        result = run_cli("repo-server", "token", args[0], repo.dir, *args[1:], check=False)
        assert result.returncode == 1 and result.stderr.startswith(b"error: "), result.stderr
        assert complaint in result.stderr
    assert tokens.read_bytes() == before

    tokens.write_text("{not json")
    broken = run_cli("repo-server", "token", "list", repo.dir, check=False)
    assert broken.returncode == 1 and b"not a token file" in broken.stderr


def test_an_empty_token_file_or_unknown_lease_or_huge_body_is_refused(
    tmp_path: Path, repo: Repo, server: str
) -> None:
    (tmp_path / "src").mkdir()
    empty = publish_http(tmp_path / "src", server, "/sw", token_file(tmp_path, ""), check=False)
    assert empty.returncode == 1 and b"the file is empty" in empty.stderr

    auth = {"Authorization": f"Bearer {make_token(repo, 'ci', '/sw')}"}
    gone = requests.post(
        f"{server}{API}/leases/{'0' * 32}/commit", json={}, headers=auth, timeout=5
    )
    assert gone.status_code == 410 and "start the publish again" in gone.json()["error"]
    lease = _lease(server, auth["Authorization"].split()[1], "/sw")
    huge = requests.post(
        f"{server}{API}/leases/{lease}/objects", data=b"x" * (PACK_LIMIT + 2 * MiB),
        headers=auth, timeout=30,
    )  # fmt: skip
    assert huge.status_code == 413
    assert head_revision(repo) == 0
