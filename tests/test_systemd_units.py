"""The systemd units shipped in examples/systemd/: valid for systemd, their command lines
accepted by today's `repo-server`, and each one run for real on a repository (with the
paths of this test in place of /srv/...), as the timers would run them.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from repo_server.cli import build_parser
from tests.conftest import BIN, Repo, free_port, publish, run_cli, stop, wait_until_serving

UNITS = Path(__file__).parent.parent / "examples" / "systemd"
INSTALLED = "/opt/cvmfs-py/bin/repo-server"  # where the units expect the venv's script

Unit = dict[str, dict[str, list[str]]]  # section -> key -> values (keys may repeat)


def parse_unit(path: Path) -> Unit:
    """A unit file as systemd reads it: [Section] headers, Key=Value lines, # comments."""
    unit: Unit = {}
    section = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert section is not None and sep and key.strip(), f"{path.name}:{number}: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def units(suffix: str) -> list[Path]:
    return sorted(UNITS.glob(f"*.{suffix}"))


def exec_start(path: Path) -> list[str]:
    (command,) = parse_unit(path)["Service"]["ExecStart"]
    return shlex.split(command)


def test_every_unit_parses_and_every_timer_starts_a_shipped_service() -> None:
    services, timers = units("service"), units("timer")
    assert {p.stem for p in services} >= {
        "repo-server", "repo-server-resign", "repo-server-whitelist-renew",
        "repo-server-gc", "repo-server-replicate",
    }  # fmt: skip
    assert {p.stem for p in timers} == {p.stem for p in services} - {"repo-server"}
    for timer in timers:
        parsed = parse_unit(timer)
        assert parsed["Timer"].keys() & {"OnCalendar", "OnUnitInactiveSec"}, timer.name
        assert parsed["Install"]["WantedBy"] == ["timers.target"], timer.name
    for service in services:
        parsed = parse_unit(service)
        kind = parsed["Service"]["Type"]
        assert kind == (["exec"] if service.stem == "repo-server" else ["oneshot"]), service.name
        argv = exec_start(service)
        assert argv[0] == INSTALLED, service.name
        build_parser().parse_args(argv[1:])  # exits 2 on an option repo-server lacks
    documented = (UNITS.parent.parent / "docs" / "OPERATING.md").read_text()
    for unit in services + timers:
        assert unit.name in documented, f"{unit.name} is not in docs/OPERATING.md"


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd)")
    for unit in UNITS.iterdir():  # verify wants the ExecStart binary to exist
        (tmp_path / unit.name).write_text(
            unit.read_text().replace(INSTALLED, str(BIN / "repo-server"))
        )

    result = subprocess.run(
        [analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True, timeout=120,
    )  # fmt: skip

    said = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not said.strip(), said


def localised(path: Path, places: dict[str, str]) -> list[str]:
    """The unit's command line with this test's paths for the unit's."""
    argv = exec_start(path)
    argv[0] = str(BIN / "repo-server")
    return [places.get(arg, arg) for arg in argv]


def test_the_units_commands_run_on_a_real_repository_and_mirror(repo: Repo, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello").write_bytes(b"hello\n")
    publish(tmp_path / "src", repo, "/sw/1.0")
    access = tmp_path / "log" / "access.log"
    access.parent.mkdir()
    port = free_port()
    places = {
        "/srv/repo": str(repo.dir),
        "/srv/mirror": str(tmp_path / "mirror"),
        "/etc/cvmfs-py/sw.example.org.pub": str(repo.pub),
        "/var/log/repo-server/access.log": str(access),
        "127.0.0.1:8000": f"127.0.0.1:{port}",
        "http://stratum0.example.org/sw": f"http://127.0.0.1:{port}",
    }
    serve = localised(UNITS / "repo-server.service", places)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(serve, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url + "/health", server, log)
        for name in ("resign", "whitelist-renew", "gc", "replicate"):
            argv = localised(UNITS / f"repo-server-{name}.service", places)
            done = subprocess.run(argv, capture_output=True, timeout=300)
            assert done.returncode == 0, f"{name}: {done.stderr.decode()}"
        assert requests.get(url + "/health").json()["revision"] == 1
        mirror = run_cli("repo-server", "check", tmp_path / "mirror", "--key", repo.pub)
        assert mirror.stdout.decode().startswith("check ok")
        deadline = time.monotonic() + 10
        while "GET /health" not in (access.read_text() if access.exists() else ""):
            assert time.monotonic() < deadline, "the access log stays empty"
            time.sleep(0.1)
    finally:
        stop(server)
    assert server.returncode == 0  # SIGTERM, as systemd stops it: a clean exit
    run_cli("repo-server", "check", repo.dir)
