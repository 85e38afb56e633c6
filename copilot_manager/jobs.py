"""A job as submitted (protocol v1, docs/COPILOT.md "Jobs"): parsed and checked once
from JSON (the submit endpoint, the CLI's job files), then stored as its JSON.

An input without a URL is served by the manager itself (GET /copilot/v1/inputs/SHA256);
the URL the agent sees is filled in when the job is handed out.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from copilot_manager.errors import ManagerError

API = "/copilot/v1"  # protocol v1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_ATTEMPTS = 3
LEASE_S = 300


@dataclass(frozen=True)
class Repository:
    name: str
    url: str
    public_key: str  # PEM
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Input:
    name: str
    sha256: str
    size: int
    url: str | None = None  # None: served by the manager


@dataclass(frozen=True)
class Resources:
    cpus: int = 0
    memory_mb: int = 0
    disk_mb: int = 0

    def fits(self, offered: Resources) -> bool:
        return (
            self.cpus <= offered.cpus
            and self.memory_mb <= offered.memory_mb
            and self.disk_mb <= offered.disk_mb
        )


@dataclass(frozen=True)
class JobSpec:
    command: str
    environment: dict[str, str] = field(default_factory=dict)
    repositories: list[Repository] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    lease_s: int = LEASE_S
    max_attempts: int = MAX_ATTEMPTS
    resources: Resources = field(default_factory=Resources)

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["inputs"] = [{k: v for k, v in i.items() if v is not None} for i in raw["inputs"]]
        return raw


def is_name(name: object) -> bool:
    """A file name an input or output may have: no directories, no dot files."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def _fail(where: str, text: str) -> ManagerError:
    return ManagerError(f"{where}: {text}")


def _str(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise _fail(where, f"{key!r} must be a string")
    return value


def _int(raw: dict[str, Any], key: str, where: str, default: int, low: int, high: int) -> int:
    value = raw.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise _fail(where, f"{key!r} must be a whole number from {low} to {high}")
    return value


def _list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise _fail(where, f"{key!r} must be a list")
    return value


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be an object (a table)")
    return value


def parse_repository(raw: object, where: str) -> Repository:
    item = _object(raw, where)
    paths = _list(item, "paths", where)
    if not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise _fail(where, "'paths' must be absolute paths such as /sw/hello/1.0")
    name = _str(item, "name", where)
    if not is_name(name):
        raise _fail(where, f"repository name {name!r}: use letters, digits and '.-_'")
    url = _str(item, "url", where)
    if not url.startswith(("http://", "https://")):
        raise _fail(where, f"repository url {url!r}: give an http:// or https:// URL")
    return Repository(name, url, _str(item, "public_key", where), paths)


def parse_input(raw: object, where: str) -> Input:
    item = _object(raw, where)
    name = item.get("name")
    if not is_name(name):
        raise _fail(where, f"input name {name!r}: a file name of letters, digits, '.-_'")
    sha = _str(item, "sha256", where)
    if not SHA256_RE.fullmatch(sha):
        raise _fail(where, "'sha256' must be 64 lower-case hex digits")
    url = item.get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise _fail(where, "'url' must be an http:// or https:// URL (or absent: the manager)")
    return Input(str(name), sha, _int(item, "size", where, -1, 0, 1 << 50), url)


def parse_job(raw: object, where: str = "job") -> JobSpec:
    """A JobSpec from its JSON form, or ManagerError naming the field that is wrong."""
    item = _object(raw, where)
    known = {f for f in JobSpec.__dataclass_fields__}
    unknown = sorted(set(item) - known)
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    command = _str(item, "command", where)
    if not command.strip():
        raise _fail(where, "'command' must not be empty")
    environment = _object(item.get("environment", {}), f"{where} environment")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in environment.items()):
        raise _fail(where, "'environment' maps names to strings")
    outputs = _list(item, "outputs", where)
    if not all(is_name(o) for o in outputs) or len(set(outputs)) != len(outputs):
        raise _fail(where, "'outputs' must be distinct file names (letters, digits, '.-_')")
    inputs = [
        parse_input(x, f"{where} input {i}") for i, x in enumerate(_list(item, "inputs", where))
    ]
    if len({i.name for i in inputs}) != len(inputs):
        raise _fail(where, "two inputs have the same name")
    resources = _object(item.get("resources", {}), f"{where} resources")
    return JobSpec(
        command=command,
        environment=dict(environment),
        repositories=[
            parse_repository(x, f"{where} repository {i}")
            for i, x in enumerate(_list(item, "repositories", where))
        ],
        inputs=inputs,
        outputs=list(outputs),
        lease_s=_int(item, "lease_s", where, LEASE_S, 5, 7 * 86400),
        max_attempts=_int(item, "max_attempts", where, MAX_ATTEMPTS, 1, 1000),
        resources=parse_resources(resources, f"{where} resources"),
    )


def parse_resources(raw: dict[str, Any], where: str) -> Resources:
    """What a job needs, or what an agent offers (the get-job body)."""
    return Resources(
        cpus=_int(raw, "cpus", where, 0, 0, 1 << 20),
        memory_mb=_int(raw, "memory_mb", where, 0, 0, 1 << 40),
        disk_mb=_int(raw, "disk_mb", where, 0, 0, 1 << 40),
    )


def parse_jobs(raw: object) -> list[JobSpec]:
    """One job or a list of them (the submit endpoint's body)."""
    if isinstance(raw, dict) and "jobs" in raw:
        raw = raw["jobs"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ManagerError("no jobs given")
    return [parse_job(x, f"job {i}" if len(items) > 1 else "job") for i, x in enumerate(items)]
