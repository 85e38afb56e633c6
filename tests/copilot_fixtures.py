"""A private redis-server (unix socket, appendonly with fsync on every write, in a tmp
directory) and the Co-Pilot manager run by its CLI on a free loopback port, with an
agent and a submitter token: for the manager's tests, the agent's, and the bench.

    with redis_server(tmp / "redis") as redis, manager_process(redis, tmp / "m") as m:
        m.submit({"command": "true"}); m.agent("POST", "/jobs/get", json={...})

Every process started here is stopped by PID when its block ends, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import free_port, stop

BIN = Path(sys.executable).parent
API = "/copilot/v1"


@dataclass
class RedisServer:
    """redis-server on a unix socket in dir, its AOF kept there across restarts."""

    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    cpus: frozenset[int] | None = None  # run it on these CPUs only (the bench)
    appendfsync: str = "always"

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            pytest.skip("needs redis-server (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
             "--save", "", "--logfile", str(log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=None if self.cpus is None else lambda: pin(self.cpus),
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, "redis-server did not answer within 20 s"
            time.sleep(0.05)

    def answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)
            self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()


def pin(cpus: frozenset[int] | None) -> None:
    os.sched_setaffinity(0, cpus or ())


@contextlib.contextmanager
def redis_server(
    directory: Path, cpus: frozenset[int] | None = None, appendfsync: str = "always"
) -> Iterator[RedisServer]:
    server = RedisServer(directory, cpus=cpus, appendfsync=appendfsync)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll check until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def make_token(tokens: Path, role: str, name: str) -> str:
    result = subprocess.run(
        [str(BIN / "copilot-manager"), "token", "add", "--tokens", str(tokens),
         "--role", role, "--name", name],
        capture_output=True, check=True,
    )  # fmt: skip
    return result.stdout.decode().strip()


@dataclass
class Manager:
    """`copilot-manager serve` on a free loopback port; call it as an agent or a submitter."""

    redis: RedisServer
    dir: Path
    outputs: str  # a directory or s3://BUCKET/PREFIX
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    agent_token: str = ""
    submitter_token: str = ""
    cpus: frozenset[int] | None = None  # run it on these CPUs only (the bench)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tokens(self) -> Path:
        return self.dir / "tokens"

    def share_tokens(self, other: Manager) -> None:
        """Accept other's tokens (managers behind one Redis share a token directory)."""
        self.tokens.mkdir(parents=True, exist_ok=True)
        for role in ("agent", "submitter"):
            name = f"{role}.json"
            (self.tokens / name).write_bytes((other.tokens / name).read_bytes())
        self.agent_token, self.submitter_token = other.agent_token, other.submitter_token

    @property
    def log(self) -> Path:
        return self.dir / "manager.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.agent_token:
            self.agent_token = make_token(self.tokens, "agent", "agents")
            self.submitter_token = make_token(self.tokens, "submitter", "operator")
        self.port = self.port or free_port()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "copilot-manager"), "serve", "--listen", f"127.0.0.1:{self.port}",
                 "--redis", self.redis.url, "--tokens", str(self.tokens),
                 "--outputs", self.outputs, "--retry-after", "1", *self.extra],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                preexec_fn=None if self.cpus is None else lambda: pin(self.cpus),
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"copilot-manager exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(self.url + API + "/health", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"manager silent: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)
            self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def call(self, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return requests.request(
            method, self.url + API + path, headers=headers, timeout=30, **kwargs
        )

    def agent(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.call(self.agent_token, method, path, **kwargs)

    def submitter(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.call(self.submitter_token, method, path, **kwargs)

    def submit(self, *jobs: dict[str, Any]) -> list[str]:
        answer = self.submitter("POST", "/jobs", json=list(jobs))
        assert answer.status_code == 201, answer.text
        return list(answer.json()["ids"])

    def job(self, job_id: str) -> dict[str, Any]:
        answer = self.submitter("GET", f"/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def status(self) -> dict[str, Any]:
        answer = self.submitter("GET", "/status")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """`copilot-manager ARGS --url ... ` with the submitter token in the environment."""
        env = {**os.environ, "COPILOT_URL": self.url, "COPILOT_TOKEN": self.submitter_token}
        result = subprocess.run(
            [str(BIN / "copilot-manager"), *args], capture_output=True, env=env, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"copilot-manager {args}: {result.stderr.decode()}")
        return result


@contextlib.contextmanager
def manager_process(
    redis: RedisServer,
    directory: Path,
    outputs: str | None = None,
    *extra: str,
    tokens_of: Manager | None = None,
    cpus: frozenset[int] | None = None,
    **env: str,
) -> Iterator[Manager]:
    """A manager for the block; with tokens_of, it takes that manager's tokens."""
    manager = Manager(redis, directory, outputs or str(directory / "outputs"), list(extra), env)
    manager.cpus = cpus
    if tokens_of is not None:
        manager.share_tokens(tokens_of)
    try:
        manager.start()
        yield manager
    finally:
        manager.stop()


def get_job(manager: Manager, agent: str = "a1", **resources: int) -> tuple[dict[str, Any], str]:
    """One job leased to agent (the test expects one): (job, lease id)."""
    offered = {"cpus": 1, "memory_mb": 512, "disk_mb": 1024, **resources}
    answer = manager.agent("POST", "/jobs/get", json={"agent": agent, "resources": offered})
    assert answer.status_code == 200, f"{answer.status_code} {answer.text}"
    body = answer.json()
    return body["job"], body["lease"]["id"]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def manager(redis: RedisServer, tmp_path: Path) -> Iterator[Manager]:
    with manager_process(redis, tmp_path / "manager") as m:
        yield m
