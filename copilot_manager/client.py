"""The submitter's side of protocol v1 (what `copilot-manager submit|status|requeue|cancel`
send), and turning a job file or the command line's flags into jobs: local input files
are hashed and uploaded to the manager, which serves them to agents.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from copilot_manager.errors import ManagerError
from copilot_manager.jobs import API

TIMEOUT = 60
RETRY_S = 60  # how long a submission is retried while the manager does not answer


@dataclass
class LocalInput:
    path: Path
    name: str
    sha256: str
    size: int


def hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def local_input(path: Path, name: str | None = None) -> LocalInput:
    if not path.is_file():
        raise ManagerError(f"input {path}: no such file")
    sha, size = hash_file(path)
    return LocalInput(path, name or path.name, sha, size)


def load_job_file(path: Path) -> list[dict[str, Any]]:
    """Jobs from a JSON file (one job or a list) or a TOML file (one job, or [[jobs]]).
    An input may name a local "path" instead of url/sha256/size; a repository may name
    its "public_key_file"; both are resolved relative to the file."""
    try:
        text = path.read_text()
        raw: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ManagerError(f"job file {path}: {exc}") from exc
    if isinstance(raw, dict) and "jobs" in raw:
        raw = raw["jobs"]
    jobs = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(j, dict) for j in jobs):
        raise ManagerError(f"job file {path}: expected a job object or a list of them")
    return [_resolve(job, path.parent) for job in jobs]


def _resolve(job: dict[str, Any], base: Path) -> dict[str, Any]:
    job = dict(job)
    for repo in job.get("repositories", []):
        if isinstance(repo, dict) and "public_key_file" in repo:
            repo["public_key"] = (base / repo.pop("public_key_file")).read_text()
    inputs = []
    for item in job.get("inputs", []):
        if isinstance(item, dict) and "path" in item:
            found = local_input(base / item["path"], item.get("name"))
            item = {"name": found.name, "sha256": found.sha256, "size": found.size}
            item["_path"] = str(found.path)
        inputs.append(item)
    job["inputs"] = inputs
    return job


class Client:
    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, retry: bool = False, **kwargs: Any) -> Any:
        """One request; with retry, a request that may safely be sent again (it is
        idempotent) is, while the manager or its Redis is unreachable (RETRY_S)."""
        deadline = time.monotonic() + (RETRY_S if retry else 0)
        pause = 0.5
        while True:
            try:
                response = self.session.request(method, self.url + path, timeout=TIMEOUT, **kwargs)
            except requests.RequestException as exc:
                if time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 5)
                    continue
                raise ManagerError(f"{self.url}: {exc} (is the manager running there?)") from exc
            if response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 5)
                continue
            break
        if response.status_code >= 400:
            try:
                text = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                text = response.text.strip()[:200]
            raise ManagerError(f"{self.url} answered {response.status_code}: {text}")
        return response.json() if response.content else None

    def upload_input(self, path: Path, sha256: str) -> None:
        with open(path, "rb") as f:
            self._call(
                "PUT", f"{API}/inputs/{sha256}", data=f, headers={"X-Content-SHA256": sha256}
            )  # not retried: nothing is queued yet, and running submit again is harmless

    def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        """Upload the local inputs the jobs name (each once), then submit the jobs."""
        sent: set[str] = set()
        for job in jobs:
            for item in job.get("inputs", []):
                path = item.pop("_path", None) if isinstance(item, dict) else None
                if path is not None and item["sha256"] not in sent:
                    self.upload_input(Path(path), item["sha256"])
                    sent.add(item["sha256"])
        # A key per submission: sent again after a lost answer, it queues nothing twice.
        key = {"Idempotency-Key": secrets.token_urlsafe(24)}
        return list(self._call("POST", f"{API}/jobs", retry=True, json=jobs, headers=key)["ids"])

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", f"{API}/status"))

    def show(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"{API}/jobs/{job_id}"))

    def requeue(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"{API}/jobs/{job_id}/requeue"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"{API}/jobs/{job_id}/cancel"))
