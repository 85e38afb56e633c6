"""Network failures as a user meets them: every program (cvmfs-client, repo-server
replicate, cvmbuild publish over HTTP) says in one line what failed, at which URL, and
what to do; only what a retry can fix is retried; a private CA is given with
--ca-bundle or CVMFS_CA_BUNDLE."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Repo, free_port, publish, run_cli, serving_nginx
from tests.tls_server import make_private_ca, serving_tls

BAD_HOST = "http://no-such-host.invalid/repo"


@pytest.fixture
def published(repo: Repo, tmp_path: Path) -> Repo:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "hello").write_text("hello\n")
    publish(src, repo, "/sw/1.0")
    return repo


@pytest.fixture
def token(published: Repo, tmp_path: Path) -> Path:
    made = run_cli("repo-server", "token", "add", published.dir, "--name", "ci", "--path", "/sw")
    path = tmp_path / "token"
    path.write_bytes(made.stdout)
    return path


def one_error_line(result: object) -> str:
    """The single `error: ...` line a failed command printed (exit 1), after any notices
    of a retry."""
    stderr = result.stderr.decode()  # type: ignore[attr-defined]
    assert result.returncode == 1, stderr  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if "; retrying (" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def ls(url: str, repo: Repo, *extra: str, env: dict[str, str] | None = None) -> object:
    return run_cli("cvmfs-client", "ls", url, "/", "--key", repo.pub, *extra, check=False, env=env)


def replicate(url: str, repo: Repo, mirror: Path, *extra: str) -> object:
    return run_cli("repo-server", "replicate", url, mirror, "--key", repo.pub, *extra, check=False)


def publish_to(url: str, src: Path, token: Path, *extra: str) -> object:
    return run_cli(
        "cvmbuild", "publish", src, "--repo", url, "--path", "/sw/2.0",
        "--token-file", token, *extra, check=False,
    )  # fmt: skip


def attempts(stderr: bytes) -> int:
    """How many times --debug says a request was tried and failed."""
    return stderr.count(b"trying the next mirror or proxy")


# -- each kind of failure, in every program ----------------------------------------------


def test_a_refused_port_is_named_and_retried(published: Repo, token: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/repo"
    for result in (
        ls(url, published),
        replicate(url, published, tmp_path / "mirror"),
        publish_to(url, tmp_path, token),
    ):
        line = one_error_line(result)
        assert url in line and "connection refused" in line and "is the server running" in line
    # A server that is restarting may be back a moment later: asked again.
    assert attempts(ls(url, published, "--debug").stderr) == 3  # type: ignore[attr-defined]
    assert b"retrying" in publish_to(url, tmp_path, token).stderr  # type: ignore[attr-defined]


def test_a_bad_host_name_fails_at_once_with_a_dns_error(
    published: Repo, token: Path, tmp_path: Path
) -> None:
    for result in (
        ls(BAD_HOST, published),
        replicate(BAD_HOST, published, tmp_path / "mirror"),
        publish_to(BAD_HOST, tmp_path, token),
    ):
        line = one_error_line(result)
        assert BAD_HOST in line and "'no-such-host.invalid' not found (DNS)" in line
        assert b"retrying" not in result.stderr  # type: ignore[attr-defined]
    # Asking the resolver again does not fix a typo: one attempt, no backoff.
    assert attempts(ls(BAD_HOST, published, "--debug").stderr) == 1  # type: ignore[attr-defined]


def test_a_scheme_typo_is_an_error_not_a_directory(published: Repo, tmp_path: Path) -> None:
    for typo, says in (
        ("htp://host/repo", "unknown URL scheme 'htp'"),
        ("http:/host/repo", "malformed URL; expected http://HOST/PATH"),
        ("https:host/repo", "malformed URL; expected https://HOST/PATH"),
    ):
        assert says in one_error_line(ls(typo, published))
        assert says in one_error_line(replicate(typo, published, tmp_path / "mirror"))
        assert says in one_error_line(run_cli("repo-server", "info", typo, check=False))
        assert says in one_error_line(
            run_cli("cvmbuild", "publish", tmp_path, "--repo", typo, "--path", "/x", check=False)
        )
    served = "http://127.0.0.1:8000/repo"
    line = one_error_line(run_cli("repo-server", "info", served, check=False))
    assert "takes a repository directory" in line and "replicate" in line
    # check reads a URL as clients do, with the key they pin
    line = one_error_line(run_cli("repo-server", "check", served, check=False))
    assert "give the repository's master public key (--key NAME.pub)" in line


def test_a_wrong_path_and_a_server_without_a_repository(
    published: Repo, token: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with (
        serving_nginx(published.dir, tmp_path / "nginx") as nginx,
        serving_nginx(empty, tmp_path / "nginx-empty") as other,
    ):
        for url in (f"{nginx.url}/wrong/path", other.url):
            line = one_error_line(ls(url, published))
            assert f"{url}: not a repository" in line and "HTTP 404" in line
            assert "base URL" in line
            line = one_error_line(replicate(url, published, tmp_path / "mirror"))
            assert f"{url}: not a repository" in line
        # A static web server has no publish API.
        line = one_error_line(publish_to(nginx.url, tmp_path, token))
        assert f"{nginx.url}/api/v1/leases: not found (HTTP 404" in line
        assert "give the URL of a `repo-server serve`" in line


class _Failing(BaseHTTPRequestHandler):
    """Every GET fails with 503 (a proxy whose backend is down); every POST with 405,
    as a static web server answers the publish API."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(503)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def failing_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_server_error_is_retried_then_named(published: Repo, token: Path, tmp_path: Path) -> None:
    with failing_server() as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/repo"
        line = one_error_line(ls(url, published))
        assert "server error (HTTP 503)" in line and "try again later" in line
        assert server.hits == 3  # type: ignore[attr-defined]

        server.hits = 0  # type: ignore[attr-defined]
        line = one_error_line(publish_to(url, tmp_path, token))
        assert f"{url}/api/v1/leases: method not allowed (HTTP 405" in line
        assert "publishing needs the URL of a `repo-server serve`" in line
        assert server.hits == 1  # type: ignore[attr-defined]  # not worth a retry


# -- TLS ---------------------------------------------------------------------------------


def test_a_private_ca_is_refused_until_given_with_ca_bundle(
    published: Repo, token: Path, tmp_path: Path
) -> None:
    ca = make_private_ca(tmp_path / "ca")
    src = tmp_path / "release"
    src.mkdir()
    (src / "notes.txt").write_text("over https\n")
    with serving_tls(published.dir, published.keys, ca, tmp_path / "tls.log") as url:
        for result in (
            ls(url, published),
            replicate(url, published, tmp_path / "mirror"),
            publish_to(url, src, token),
        ):
            line = one_error_line(result)
            assert url in line and "TLS certificate verification failed" in line
            assert "--ca-bundle FILE" in line
            assert b"retrying" not in result.stderr  # type: ignore[attr-defined]
        assert attempts(ls(url, published, "--debug").stderr) == 1  # type: ignore[attr-defined]

        listing = ls(url, published, "--ca-bundle", ca.ca_pem)
        assert listing.stdout == b"sw\n"  # type: ignore[attr-defined]
        assert ls(url, published, env={"CVMFS_CA_BUNDLE": str(ca.ca_pem)}).stdout == b"sw\n"  # type: ignore[attr-defined]
        mirrored = replicate(url, published, tmp_path / "mirror", "--ca-bundle", ca.ca_pem)
        assert mirrored.returncode == 0, mirrored.stderr  # type: ignore[attr-defined]
        done = publish_to(url, src, token, "--ca-bundle", ca.ca_pem)
        assert done.returncode == 0, done.stderr  # type: ignore[attr-defined]
        assert b"published revision 2" in done.stdout  # type: ignore[attr-defined]
        cat = run_cli(
            "cvmfs-client", "cat", url, "/sw/2.0/notes.txt", "--key", published.pub,
            "--ca-bundle", ca.ca_pem,
        )  # fmt: skip
        assert cat.stdout == b"over https\n"
    missing = ls(url, published, "--ca-bundle", tmp_path / "nope.pem")
    assert "nope.pem: no such file" in one_error_line(missing)


def test_a_wrong_key_says_it_is_not_the_master_key(published: Repo, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_cli("repo-server", "init", other, "--name", published.name)
    line = one_error_line(
        ls(
            str(published.dir),
            published,
            "--key",
            tmp_path / "other.keys" / f"{published.name}.pub",
        )
    )
    assert "this key is not the repository's master key" in line
