"""`repo-server serve` over real HTTP, and clients facing dead, endless or lying servers.

The story: an operator serves a repository with `repo-server serve`; appliances read it
with `cvmfs-client` through mirrors and proxies, some of which are down or hostile.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from cvmfs_client.fetcher import LOW_SPEED_TIME_S, RETRIES
from cvmfs_format.objects import object_path
from cvmfs_format.signed import MAX_DOCUMENT_SIZE
from repo_server.repository import LocalRepository
from tests.conftest import BIN, Repo, free_port, open_reader, run_cli, wait_until_serving

MiB = 1024 * 1024


@dataclass(frozen=True)
class Served:
    repo: Repo
    url: str
    files: dict[str, bytes]  # repository path -> content

    def digest_of(self, path: str) -> str:
        """Name of the object holding a small file's content."""
        digest = open_reader(self.repo).lookup(path).hash
        assert digest is not None
        return digest

    def object_of(self, path: str) -> str:
        """Where that object is, relative to the repository root."""
        return object_path(self.digest_of(path))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, dict[str, bytes]]:
    base = tmp_path_factory.mktemp("served")
    LocalRepository.init(base / "repo", "sw.example.org")
    repo = Repo(base / "repo", base / "repo.keys", "sw.example.org")
    rng = random.Random(7)
    files = {
        "bin/hello": b"#!/bin/sh\necho hello from the repository\n",
        "share/readme.txt": b"Release notes: " + b"all muons accounted for. " * 40,
        "lib/libphysics.so": rng.randbytes(6 * MiB),  # chunked
    }
    for relpath, content in files.items():
        (base / "src" / relpath).parent.mkdir(parents=True, exist_ok=True)
        (base / "src" / relpath).write_bytes(content)
    run_cli(
        "cvmbuild", "publish", base / "src", "--repo", repo.dir, "--path", "/sw/1.0",
        env={"CVMBUILD_CACHE_DIR": str(base / "statcache")},
    )  # fmt: skip
    (repo.dir / "txn" / "leftover").write_bytes(b"half-written object of a killed publish")
    return repo, {f"/sw/1.0/{k}": v for k, v in files.items()}


@pytest.fixture(scope="module")
def served(
    published: tuple[Repo, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    repo, files = published
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [BIN / "repo-server", "serve", repo.dir, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url + "/", proc, log)
        yield Served(repo, url, files)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raw_get(url: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    """Send path exactly as given: no client-side normalisation of `..` or escapes."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- reading with cvmfs-client over HTTP ---------------------------------------------------


def test_client_lists_and_reads_published_files_over_http(served: Served) -> None:
    listing = run_cli("cvmfs-client", "ls", served.url, "/sw/1.0", "--key", served.repo.pub)
    assert listing.stdout.decode().split() == ["bin", "lib", "share"]
    for path, content in served.files.items():
        cat = run_cli("cvmfs-client", "cat", served.url, path, "--key", served.repo.pub)
        assert cat.stdout == content, path


def test_client_fails_over_from_a_dead_mirror_to_a_live_one(served: Served) -> None:
    mirrors = f"http://127.0.0.1:{free_port()};{served.url}"
    cat = run_cli("cvmfs-client", "cat", mirrors, "/sw/1.0/bin/hello", "--key", served.repo.pub)
    assert cat.stdout == served.files["/sw/1.0/bin/hello"]


# -- HTTP semantics that proxies and caches rely on ------------------------------------------


def test_range_request_returns_exactly_the_requested_bytes(served: Served) -> None:
    relpath = served.object_of("/sw/1.0/share/readme.txt")
    on_disk = (served.repo.dir / relpath).read_bytes()
    response = requests.get(f"{served.url}/{relpath}", headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == on_disk[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(on_disk)}"


def test_unchanged_file_revalidates_with_304(served: Served) -> None:
    url = f"{served.url}/{served.object_of('/sw/1.0/bin/hello')}"
    first = requests.get(url)
    etag, last_modified = first.headers.get("ETag"), first.headers.get("Last-Modified")
    assert etag and last_modified
    for condition in ({"If-None-Match": etag}, {"If-Modified-Since": last_modified}):
        again = requests.get(url, headers=condition)
        assert again.status_code == 304, condition
        assert again.content == b""
        assert again.headers["ETag"] == etag
        assert "immutable" in again.headers["Cache-Control"]
    changed = requests.get(url, headers={"If-None-Match": '"another-version"'})
    assert changed.status_code == 200 and changed.content == first.content


def max_age(cache_control: str) -> int:
    match = re.search(r"max-age=(\d+)", cache_control)
    assert match, cache_control
    return int(match.group(1))


def test_objects_are_cached_for_long_and_the_manifest_briefly(served: Served) -> None:
    obj = requests.get(f"{served.url}/{served.object_of('/sw/1.0/bin/hello')}")
    assert "immutable" in obj.headers["Cache-Control"]
    assert max_age(obj.headers["Cache-Control"]) >= 30 * 86400
    for name in ("manifest", "whitelist"):
        policy = requests.get(f"{served.url}/{name}").headers["Cache-Control"]
        assert "immutable" not in policy
        assert max_age(policy) <= 300, name


def test_head_gives_the_size_without_the_body(served: Served) -> None:
    response = requests.head(f"{served.url}/manifest")
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == (served.repo.dir / "manifest").stat().st_size
    assert response.content == b""


@pytest.mark.parametrize(
    "path",
    [
        "/.lock",
        "/txn/leftover",
        "/data/../../etc/passwd",
        "/data/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/data/..%2f..%2f..%2fetc%2fpasswd",
        "/../repo.keys/sw.example.org.masterkey",
        "/%2e%2e/repo.keys/sw.example.org.masterkey",
        "/data/00/../../../repo.keys/sw.example.org.key",
        "//etc/passwd",
    ],
)
def test_nothing_outside_the_published_repository_is_served(served: Served, path: str) -> None:
    for method in ("GET", "HEAD"):
        status, body = raw_get(served.url, path, method)
        assert status == 404, (method, path)
        assert b"root:" not in body and b"PRIVATE KEY" not in body and b"half-written" not in body


# -- clients facing hostile servers ----------------------------------------------------------


@dataclass
class HostileServer:
    url: str
    bytes_sent: int = 0


Lie = Callable[[HostileServer, BaseHTTPRequestHandler], None]


def send_body(handler: BaseHTTPRequestHandler, body: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def hostile_server(served: Served) -> Iterator[Callable[[str, Lie], HostileServer]]:
    """Start loopback servers that serve the repository honestly except for one path,
    where `lie` writes the response instead."""
    servers: list[ThreadingHTTPServer] = []

    def start(lie_about: str, lie: Lie) -> HostileServer:
        state = HostileServer("")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                relpath = self.path.lstrip("/")
                if relpath == lie_about:
                    lie(state, self)
                    return
                full = served.repo.dir / relpath
                if ".." in relpath or not full.is_file():
                    self.send_error(404)
                    return
                send_body(self, full.read_bytes())

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.server_address[1]}"
        return state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def stream_forever(state: HostileServer, handler: BaseHTTPRequestHandler) -> None:
    """No Content-Length, and data until the client hangs up (or 1 GiB, to end the test)."""
    handler.send_response(200)
    handler.end_headers()
    block = b"x" * 65536
    try:
        while state.bytes_sent < 1024 * MiB:
            handler.wfile.write(block)
            state.bytes_sent += len(block)
    except OSError:
        pass  # the client cut us off, as it should


def test_client_cuts_off_a_server_that_sends_an_endless_manifest(
    served: Served, hostile_server: Callable[[str, Lie], HostileServer]
) -> None:
    server = hostile_server("manifest", stream_forever)
    start = time.monotonic()
    cat = run_cli(
        "cvmfs-client", "cat", server.url, "/sw/1.0/bin/hello", "--key", served.repo.pub,
        check=False, timeout=60,
    )  # fmt: skip
    assert cat.returncode == 1
    stderr = cat.stderr.decode()
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "manifest" in stderr and f"larger than the expected {MAX_DOCUMENT_SIZE}" in stderr
    assert time.monotonic() - start < 30
    assert server.bytes_sent < 64 * MiB  # cut off early, not after reading everything
    assert cat.stdout == b""


def never_answer(state: HostileServer, handler: BaseHTTPRequestHandler) -> None:
    """Accept the request, then say nothing (until the test is long over)."""
    time.sleep(300)


def test_a_mirror_that_never_answers_costs_one_timeout_then_the_next_serves(
    served: Served, hostile_server: Callable[[str, Lie], HostileServer]
) -> None:
    file_digest = served.digest_of("/sw/1.0/share/readme.txt")
    silent = hostile_server(object_path(file_digest), never_answer)
    start = time.monotonic()
    cat = run_cli(
        "cvmfs-client", "cat", f"{silent.url};{served.url}", "/sw/1.0/share/readme.txt",
        "--key", served.repo.pub, timeout=60,
    )  # fmt: skip
    assert cat.stdout == served.files["/sw/1.0/share/readme.txt"]
    assert time.monotonic() - start < LOW_SPEED_TIME_S + 10

    start = time.monotonic()
    alone = run_cli(
        "cvmfs-client", "cat", silent.url, "/sw/1.0/share/readme.txt", "--key", served.repo.pub,
        check=False, timeout=120,
    )  # fmt: skip
    assert alone.returncode == 1 and alone.stderr.startswith(b"error: ")
    # bounded: every attempt is cut off by the low-speed limit
    assert time.monotonic() - start < (RETRIES + 1) * (LOW_SPEED_TIME_S + 2) + 5


def flip_a_byte(path: Path) -> Lie:
    def lie(state: HostileServer, handler: BaseHTTPRequestHandler) -> None:
        body = bytearray(path.read_bytes())
        body[len(body) // 2] ^= 0x01
        send_body(handler, bytes(body))

    return lie


@pytest.mark.parametrize("what", ["file object", "root catalog", "manifest"])
def test_client_refuses_tampered_data_from_a_hostile_server(
    served: Served, hostile_server: Callable[[str, Lie], HostileServer], what: str
) -> None:
    reader = open_reader(served.repo)
    file_digest = served.digest_of("/sw/1.0/share/readme.txt")
    target, complaint = {
        "file object": (object_path(file_digest), f"object {file_digest}: "),
        "root catalog": (object_path(reader.root_hash), f"object {reader.root_hash}: "),
        "manifest": ("manifest", "manifest: bad signature"),
    }[what]
    server = hostile_server(target, flip_a_byte(served.repo.dir / target))
    cat = run_cli(
        "cvmfs-client", "cat", server.url, "/sw/1.0/share/readme.txt", "--key", served.repo.pub,
        check=False,
    )  # fmt: skip
    assert cat.returncode == 1
    assert cat.stderr.decode().startswith("error: "), cat.stderr
    assert complaint in cat.stderr.decode()
    assert cat.stdout == b""
    assert os.path.exists(served.repo.dir / target)  # the honest copy is untouched


@pytest.mark.parametrize("what", ["file object", "manifest"])
def test_client_fails_over_from_a_mirror_serving_bad_data_to_an_honest_one(
    served: Served, hostile_server: Callable[[str, Lie], HostileServer], what: str
) -> None:
    file_digest = served.digest_of("/sw/1.0/share/readme.txt")
    target = {"file object": object_path(file_digest), "manifest": "manifest"}[what]
    bad = hostile_server(target, flip_a_byte(served.repo.dir / target))
    cat = run_cli(
        "cvmfs-client", "cat", f"{bad.url};{served.url}", "/sw/1.0/share/readme.txt",
        "--key", served.repo.pub,
    )  # fmt: skip
    assert cat.stdout == served.files["/sw/1.0/share/readme.txt"]


def test_a_dead_proxy_group_falls_over_to_the_next_group(served: Served) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cat = run_cli(
        "cvmfs-client", "cat", served.url, "/sw/1.0/bin/hello", "--key", served.repo.pub,
        "--proxy", f"{dead}|{dead};DIRECT",
    )  # fmt: skip
    assert cat.stdout == served.files["/sw/1.0/bin/hello"]
    only_dead = run_cli(
        "cvmfs-client", "cat", served.url, "/sw/1.0/bin/hello", "--key", served.repo.pub,
        "--proxy", dead, check=False,
    )  # fmt: skip
    assert only_dead.returncode == 1 and only_dead.stderr.startswith(b"error: ")
    assert f"via {dead}".encode() in only_dead.stderr
