"""Shared fixtures: a fresh repository with its keys, and the three command lines."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cvmfs_client.fetcher import DirectoryFetcher
from cvmfs_client.repository import RepositoryReader
from cvmfs_format.signed import load_public_key_pem
from cvmfs_format.trust import Floor, TrustedState
from repo_server.nginx import repository_server, standalone
from repo_server.repository import LocalRepository

pytest_plugins = ["tests.appliance_fixtures", "tests.copilot_fixtures", "tests.site_fixtures"]

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own publisher stat cache and client state (remembered
    revisions), never the user's or another test's."""
    monkeypatch.setenv("CVMBUILD_CACHE_DIR", str(tmp_path / "statcache"))
    monkeypatch.setenv("CVMFS_CLIENT_STATE_DIR", str(tmp_path / "client-state"))


@dataclass
class Repo:
    dir: Path
    keys: Path
    name: str

    @property
    def pub(self) -> Path:
        return self.keys / f"{self.name}.pub"

    def open(self) -> LocalRepository:
        return LocalRepository(self.dir, self.keys)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    LocalRepository.init(tmp_path / "repo", "test.example.org")
    return Repo(tmp_path / "repo", tmp_path / "repo.keys", "test.example.org")


def run_cli(
    *args: str | os.PathLike[str],
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """Run one of the project's console scripts (cvmbuild, repo-server, cvmfs-client)."""
    cmd = [str(BIN / str(args[0])), *map(str, args[1:])]
    result = subprocess.run(
        cmd, capture_output=True, env={**os.environ, **(env or {})}, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {result.returncode}\nstdout: {result.stdout.decode()}\n"
            f"stderr: {result.stderr.decode()}"
        )
    return result


@pytest.fixture
def cli() -> Iterator[object]:
    yield run_cli


# -- helpers the test modules share ---------------------------------------------------

MiB = 1024 * 1024

Tree = dict[str, bytes]  # relpath inside the published prefix -> content


NO_FLOOR = Floor()  # a client that has seen no revision of the repository yet


def trust_for(repo: Repo, floor: Floor = NO_FLOOR) -> TrustedState:
    """A client's trust in the repository: its master public key and name pinned."""
    key = load_public_key_pem(repo.pub.read_bytes(), str(repo.pub))
    return TrustedState(key, repo.name, floor)


def open_reader(repo: Repo, floor: Floor = NO_FLOOR, **kwargs: object) -> RepositoryReader:
    """A verifying reader of the repository directory, pinned to its master public key
    and name."""
    reader = RepositoryReader(DirectoryFetcher(str(repo.dir)), trust_for(repo, floor), **kwargs)  # type: ignore[arg-type]
    reader.load_manifest()
    return reader


def read_back(reader: RepositoryReader, path: str) -> bytes:
    return b"".join(reader.iter_content(reader.lookup(path)))


def publish(
    src: Path, repo: Repo, path: str, *extra: str, check: bool = True
) -> tuple[int, str, str]:
    """`cvmbuild publish` as a build script runs it: (exit code, stdout, stderr)."""
    result = run_cli(
        "cvmbuild", "publish", src, "--repo", repo.dir, "--path", path, *extra, check=check
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def read_tree(reader: RepositoryReader, prefix: str) -> Tree:
    """Every regular file below prefix, read and verified through the client."""
    tree: Tree = {}
    stack = [("", prefix)]
    while stack:
        rel, path = stack.pop()
        for entry in reader.listdir(path):
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir:
                stack.append((child, entry.path))
            elif entry.is_file:
                tree[child] = b"".join(reader.iter_content(entry))
    return tree


def write_build_tree(
    root: Path, *, seed: int, small_files: int, big_files: int, big_size: int = 8 * MiB
) -> Tree:
    """A release-like tree: many small, partly compressible files in directories (some
    with a `.cvmfscatalog` marker, so nested catalogs are written too) and a few files
    large enough to be cut into chunks. Returns what was written."""
    rng = random.Random(seed)
    tree: Tree = {}
    per_dir = 100
    for i in range(small_files):
        directory = f"lib{i // per_dir:03d}"
        if i % per_dir == 0 and (i // per_dir) % 5 == 0:
            tree[f"{directory}/.cvmfscatalog"] = b""
        words = b" ".join(rng.choice([b"muon", b"jet", b"track", b"vertex"]) for _ in range(40))
        tree[f"{directory}/mod{i}.py"] = rng.randbytes(rng.randint(0, 1500)) + words
    for i in range(big_files):
        tree[f"data/calib{i}.bin"] = rng.randbytes(big_size)
    for relpath, content in tree.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return tree


def backdate_history(repo: LocalRepository, seconds: int) -> None:
    """Make every revision of the history look published `seconds` earlier, as releases
    of weeks ago: gc keeps revisions that clients may still read, replaced minutes ago."""

    def shift(db: sqlite3.Connection) -> None:
        db.execute("UPDATE revisions SET published = published - ?", (seconds,))

    with repo.lock():
        repo.rewrite_history(shift)


def free_port() -> int:
    """A loopback port nothing listens on (the kernel just handed it out)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"repo-server serve exited {proc.returncode}: {log.read_text()}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise AssertionError(f"repo-server serve did not answer on {url} within {timeout} s")


@contextlib.contextmanager
def serving_process(
    repo_dir: Path, log: Path, *options: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`repo-server serve` on a free loopback port for the duration of the block, with
    its process, for tests that kill it on purpose."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "repo-server"), "serve", str(repo_dir), "--listen", url[7:], *options],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_serving(url, proc, log)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def serving(repo_dir: Path, log: Path) -> Iterator[str]:
    """`repo-server serve` on a free loopback port for the duration of the block."""
    with serving_process(repo_dir, log) as (url, _):
        yield url


def client_daemon(mountpoint: Path) -> int | None:
    """The pid of the `cvmfs-client mount` daemon serving mountpoint, if it runs."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if (
            any(arg.endswith("cvmfs-client") for arg in args)
            and "mount" in args
            and str(mountpoint) in args
        ):
            return int(entry)
    return None


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while running(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(url: str, mountpoint: Path, cache: Path, key: Path, *options: str) -> Iterator[Path]:
    """`cvmfs-client mount` for the duration of the block; unmounted (lazily if busy or
    dead) and its daemon gone afterwards."""
    with mounted_with(url, mountpoint, "--key", key, "--cache-dir", cache, *options):
        yield mountpoint


@contextlib.contextmanager
def mounted_with(
    source: str, mountpoint: Path, *options: str | os.PathLike[str]
) -> Iterator[subprocess.CompletedProcess[bytes]]:
    """`cvmfs-client mount SOURCE MOUNTPOINT OPTIONS...` (a URL, a directory or a
    repository name) as `mounted` does; yields what the command printed."""
    mountpoint.mkdir(exist_ok=True)
    result = run_cli("cvmfs-client", "mount", source, mountpoint, *options)
    daemon = client_daemon(mountpoint)
    try:
        yield result
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        if daemon is not None:
            wait_gone(daemon)


# -- real web servers -------------------------------------------------------------------


def system_binary(name: str) -> str:
    """nginx and squid live in sbin, which a non-login PATH may lack."""
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"needs {name} (apt-get install {name})")
    return found


def read_files(root: Path) -> Tree:
    """Every regular file below root (symlinks not followed), by relative path."""
    tree: Tree = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                tree[str(path.relative_to(root))] = path.read_bytes()
    return tree


def wait_accepting(
    what: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20
) -> None:
    """Until the server just started accepts connections on its loopback port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not accept connections within {timeout} s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Nginx:
    url: str
    proc: subprocess.Popen[bytes]
    access_log: Path

    def stop(self) -> None:
        stop(self.proc)  # the master stops its workers on SIGTERM


@contextlib.contextmanager
def serving_nginx(
    root: Path, work: Path, server_block: Callable[[str, str], str] = repository_server
) -> Iterator[Nginx]:
    """nginx serving directory root (a repository or a mirror) as plain static files, as
    docs/OPERATING.md configures it, for the duration of the block; work is its own.
    server_block(root, listen) may give another server block."""
    binary = system_binary("nginx")
    work.mkdir()
    port = free_port()
    conf = work / "nginx.conf"
    server = server_block(str(root.resolve()), f"127.0.0.1:{port}")
    # Workers must read the pytest tree, which is private to root.
    conf.write_text(standalone(str(work), [server], as_root=os.geteuid() == 0))
    log = work / "stderr"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-c", conf, "-p", work, "-e", work / "error.log"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_accepting("nginx", port, proc, log)
        yield Nginx(f"http://127.0.0.1:{port}", proc, work / "access.log")
    finally:
        stop(proc)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of size (e.g. "32m") mounted at where for the block, to fill a disk on
    purpose; the test is skipped unless this runs as root and may mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
