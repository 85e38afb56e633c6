"""Shared fixtures: a fresh repository with its keys, and the three command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo_server.repository import LocalRepository

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _private_stat_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own publisher stat cache, never the user's."""
    monkeypatch.setenv("CVMBUILD_CACHE_DIR", str(tmp_path / "statcache"))


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
