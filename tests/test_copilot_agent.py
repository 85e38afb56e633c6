"""The Co-Pilot agent (cvmbuild/appliance/copilot_agent.py): its pure core (what a job is,
backoff, input verification, user data), then agents as processes against the real
manager (tests/copilot_fixtures.py: a private redis-server and `copilot-manager serve`)
running programs from a repository published, served and mounted with cvmfs-client
in the test; and one appliance booted under QEMU that pulls its jobs from the manager.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cvmbuild.appliance import guest_agent
from cvmbuild.appliance.copilot_agent import (
    EXIT_NOT_RUN,
    MAX_BACKOFF_S,
    AgentConfig,
    backoff_s,
    config_from_user_data,
    run_in_appliance,
    shell_status,
)
from cvmbuild.appliance.copilot_protocol import (
    Input,
    JobError,
    ManagerError,
    error_message,
    parse_job,
    parse_offer,
)
from cvmbuild.boinc.jobfile import VmJob
from cvmbuild.boinc.vm import Vm
from cvmbuild.boinc.vm_task import user_data
from tests.appliance_fixtures import Served
from tests.boinc_client import processes_under
from tests.conftest import mounted, run_cli, serving
from tests.copilot_fixtures import Manager, manager_process, redis_server, until
from tests.test_boinc_vm import Console

EXAMPLE_JOB: dict[str, Any] = {
    "id": "17",
    "command": "python3 $CVM_CVMFS_ROOT/sw.example.org/sw/tools/1.0/bin/work.py 1",
    "environment": {"EVENTS": "100"},
    "repositories": [{"name": "sw.example.org", "url": "http://10.0.2.2:8000",
                      "public_key": "PEM", "paths": ["/sw/tools/1.0"]}],
    "inputs": [{"name": "in.txt", "url": "http://m/copilot/v1/inputs/" + "a" * 64,
                "sha256": "a" * 64, "size": 5}],
    "outputs": ["result.txt"],
    "lease_s": 300,
    "attempt": 1,  # fields the agent does not know are ignored
}  # fmt: skip


# -- the pure core -------------------------------------------------------------------


def test_a_job_as_the_manager_hands_it_out_is_understood() -> None:
    job = parse_job(EXAMPLE_JOB)
    assert job.id == "17" and job.environment == {"EVENTS": "100"}
    assert job.repositories[0].name == "sw.example.org"
    assert job.repositories[0].paths == ("/sw/tools/1.0",)
    assert job.inputs[0] == Input("in.txt", EXAMPLE_JOB["inputs"][0]["url"], "a" * 64, 5)
    assert job.outputs == ("result.txt",) and job.lease_s == 300.0


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"outputs": ["../etc/passwd"]}, "not an acceptable name"),
        ({"outputs": ["sub/result.txt"]}, "not an acceptable name"),
        ({"outputs": ["in.txt"]}, "distinct names"),
        ({"inputs": [{**EXAMPLE_JOB["inputs"][0], "sha256": "A" * 64}]}, "lowercase hex"),
        ({"inputs": [{**EXAMPLE_JOB["inputs"][0], "size": -1}]}, "negative"),
        ({"inputs": [{**EXAMPLE_JOB["inputs"][0], "url": "file:///etc/shadow"}]}, "http"),
        ({"environment": {"PATH=x": "y"}}, "environment"),
        ({"command": ["ls"]}, "command must be str"),
        ({"repositories": [{"name": "../x", "url": ""}]}, "not an acceptable name"),
        ({"lease_s": 0}, "lease_s must be positive"),
    ],
)
def test_a_job_the_agent_cannot_trust_is_refused_naming_the_field(
    change: dict[str, Any], says: str
) -> None:
    with pytest.raises(JobError, match=says):
        parse_job({**EXAMPLE_JOB, **change})


def test_an_offer_without_a_lease_is_the_managers_error_not_the_jobs() -> None:
    with pytest.raises(ManagerError, match="lease"):
        parse_offer({"job": {"id": "1"}})
    offer = parse_offer({"job": {"id": "1", "command": 3}, "lease": {"id": "L", "expires_in_s": 6}})
    assert offer.lease.expires_in_s == 6.0  # the job itself is checked later, under the lease


def test_backoff_doubles_from_one_second_to_a_minute_with_jitter() -> None:
    rng = random.Random(1)
    assert backoff_s(0, rng) == 1.0
    for attempt in range(1, 12):
        cap = min(MAX_BACKOFF_S, 2.0**attempt)
        waits = [backoff_s(attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits)
        assert len(set(waits)) > 40  # a fleet started together spreads out
    assert max(backoff_s(100, rng) for _ in range(100)) <= MAX_BACKOFF_S


def verify(data: bytes, expected: Input, chunk: int = 3) -> bytes:
    from cvmbuild.appliance.copilot_protocol import copy_verified

    out = io.BytesIO()
    copy_verified((data[i : i + chunk] for i in range(0, len(data), chunk)), out, expected)
    return out.getvalue()


def test_an_input_is_kept_only_with_its_declared_size_and_hash() -> None:
    good = Input("in.txt", "u", hashlib.sha256(b"hello").hexdigest(), 5)
    assert verify(b"hello", good) == b"hello"
    with pytest.raises(JobError, match="SHA-256 .* is not the job's"):
        verify(b"hellp", good)
    with pytest.raises(JobError, match="4 bytes, 5 declared"):
        verify(b"hell", good)


def test_an_endless_input_is_cut_at_its_declared_size() -> None:
    from cvmbuild.appliance.copilot_protocol import copy_verified

    endless = iter(lambda: b"x" * 4096, b"")
    out = io.BytesIO()
    with pytest.raises(JobError, match="more than the 10000 bytes declared"):
        copy_verified(endless, out, Input("in", "u", "0" * 64, 10000))
    assert len(out.getvalue()) < 10000


def test_status_and_error_lines_for_people() -> None:
    assert shell_status(-9) == 137 and shell_status(3) == 3
    assert error_message(b'{"error": "give a token\\nmore"}', 401) == "give a token"
    assert error_message(b"<html>gateway</html>", 502) == "<html>gateway</html>"
    assert error_message(b"", 503) == "Service Unavailable"


def test_copilot_user_data_turns_the_appliance_into_an_agent() -> None:
    text = '[copilot]\nurl = "http://10.0.2.2:8080/"\ntoken = "t0k"\nidle_exit_s = "120"\n'
    overrides = guest_agent.parse_user_data(text, "config drive")
    settings = guest_agent.apply_overrides(guest_agent.Settings(hostname="cvm-thin"), overrides)
    assert settings.copilot is not None
    assert settings.copilot.url == "http://10.0.2.2:8080"
    assert settings.copilot.token == "t0k" and settings.copilot.idle_exit_s == 120.0
    assert settings.copilot.name.startswith("cvm-thin-")  # unique: volunteers share a hostname
    assert settings.copilot.work_dir == guest_agent.COPILOT_WORK
    with pytest.raises(guest_agent.ContextError, match=r"\[copilot\] unknown key 'tokn'"):
        guest_agent.parse_user_data('[copilot]\ntokn = "x"\n', "config drive")
    for table, says in (
        ({"url": "http://m"}, r"\[copilot\] token is missing"),
        ({"url": "ftp://m", "token": "t"}, "not an http:// or https:// URL"),
        ({"url": "http://m", "token": "t", "idle_exit_s": "soon"}, "idle_exit_s must be"),
        ({"url": "http://m", "token": "t", "summary_file": "../x"}, "plain file name"),
    ):
        with pytest.raises(guest_agent.ContextError, match=says):
            guest_agent.apply_overrides(guest_agent.Settings(), {"copilot": table})
    assert config_from_user_data({"url": "http://m", "token": "t", "name": "vm7"}, "x", "/w", "d")


def test_a_boinc_work_unit_brings_the_token_to_the_job_files_copilot_url() -> None:
    job = VmJob(
        copilot_url="http://copilot.example.org:8080", user_data="[copilot]\nidle_exit_s = 600\n"
    )
    work_unit = '[copilot]\ntoken = "agent-token-of-this-batch"\n'
    text = user_data(job, work_unit)
    settings = guest_agent.apply_overrides(
        guest_agent.Settings(), guest_agent.parse_user_data(text, "config drive")
    )
    assert settings.copilot is not None
    assert settings.copilot.url == "http://copilot.example.org:8080"
    assert settings.copilot.token == "agent-token-of-this-batch"
    assert settings.copilot.idle_exit_s == 600.0


# -- agents as processes against the real manager ------------------------------------

REPO = "tools.example.org"  # not the recipe's sw.example.org: the agent mounts it
# The repository's program: reads in.txt if the job has one, reports its progress in
# steps over SECONDS, and writes result.txt.
WORK_PY = """\
import hashlib, os, sys, time
n, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
data = open("in.txt", "rb").read() if os.path.exists("in.txt") else b""
for step in range(1, 5):
    time.sleep(seconds / 4)
    with open(os.environ["CVM_PROGRESS_FILE"], "w") as f:
        f.write(f"{step / 4}\\n")
with open("result.txt", "w") as f:
    f.write(f"job {n} read {hashlib.sha256(data).hexdigest()}\\n")
"""
WORK = f"python3 $CVM_CVMFS_ROOT/{REPO}/sw/tools/1.0/bin/work.py"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result_of(n: int, data: bytes = b"") -> bytes:
    return f"job {n} read {sha(data)}\n".encode()


@dataclass
class Software:
    """The repository, served on the loopback and mounted under cvmfs_root."""

    url: str
    public_key: str
    cvmfs_root: Path

    def repository(self, name: str = REPO, paths: tuple[str, ...] = ("/sw/tools/1.0",)) -> dict:
        return {"name": name, "url": self.url, "public_key": self.public_key, "paths": list(paths)}


@pytest.fixture(scope="module")
def software(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Software]:
    if os.geteuid() != 0:
        pytest.skip("mounting the repository with cvmfs-client needs root (FUSE)")
    base = tmp_path_factory.mktemp("copilot-software")
    src = base / "tools" / "bin"
    src.mkdir(parents=True)
    (src / "work.py").write_text(WORK_PY)
    env = {"CVMBUILD_CACHE_DIR": str(base / "statcache")}
    run_cli("repo-server", "init", base / "repo", "--name", REPO)
    run_cli("cvmbuild", "publish", src.parent, "--repo", base / "repo", "--path",
            "/sw/tools/1.0", env=env)  # fmt: skip
    key = base / "repo.keys" / f"{REPO}.pub"
    (base / "cvmfs").mkdir()
    with serving(base / "repo", base / "serve.log") as url:
        with mounted(url, base / "cvmfs" / REPO, base / "cache", key):
            yield Software(url, key.read_text(), base / "cvmfs")


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    work: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        until(f"{text!r} in {self.name}'s log", lambda: text in self.text(), timeout)

    def exit_status(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs; its log:\n{self.text()}") from None


class Fleet:
    """Agent processes (`python3 -m cvmbuild.appliance.copilot_agent`) for one test;
    each is stopped by PID at the end, and so is anything still running in its
    work directory."""

    def __init__(self, manager: Manager, base: Path, cvmfs_root: Path) -> None:
        self.manager, self.base, self.cvmfs_root = manager, base, cvmfs_root
        self.agents: list[Agent] = []
        base.mkdir(parents=True, exist_ok=True)
        self.token_file = base / "agent.token"
        self.token_file.write_text(manager.agent_token + "\n")

    def start(self, name: str, idle_exit: float = 4, token_file: Path | None = None) -> Agent:
        work = self.base / name
        work.mkdir(parents=True)
        log = self.base / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cvmbuild.appliance.copilot_agent",
                 "--url", self.manager.url, "--token-file", str(token_file or self.token_file),
                 "--work", str(work), "--cvmfs-root", str(self.cvmfs_root),
                 "--idle-exit", str(idle_exit), "--name", name],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        agent = Agent(name, proc, log, work)
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.proc.kill()
            agent.proc.wait()
            for pid in processes_under(agent.work):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def fleet(manager: Manager, base: Path, software: Software) -> Iterator[Fleet]:
    agents = Fleet(manager, base, software.cvmfs_root)
    try:
        yield agents
    finally:
        agents.stop()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    with redis_server(tmp_path / "redis") as redis, manager_process(redis, tmp_path / "m") as m:
        yield m


def upload_input(manager: Manager, data: bytes) -> dict[str, Any]:
    answer = manager.submitter(
        "PUT", f"/inputs/{sha(data)}", data=data, headers={"X-Content-SHA256": sha(data)}
    )
    assert answer.status_code == 201, answer.text
    return {"name": "in.txt", "sha256": sha(data), "size": len(data)}


def wait_finished(manager: Manager, ids: list[str], timeout: float = 120) -> dict[str, dict]:
    def finished() -> dict[str, dict] | None:
        jobs = {i: manager.job(i) for i in ids}
        return jobs if all(j["state"] in ("done", "failed") for j in jobs.values()) else None

    return dict(until(f"end of jobs {ids}", finished, timeout))


def stored(manager: Manager, job_id: str) -> list[Path]:
    """The output files the manager keeps for a job (every attempt's), staging aside."""
    return sorted(p for p in (Path(manager.outputs) / "jobs" / job_id).rglob("*") if p.is_file())


def hashes(job: dict[str, Any]) -> dict[str, str]:
    """The outputs the manager recorded for a job, name -> SHA-256."""
    return {name: stored["sha256"] for name, stored in job["outputs"].items()}


def output(manager: Manager, job_id: str, name: str) -> bytes:
    answer = manager.submitter("GET", f"/jobs/{job_id}/outputs/{name}")
    assert answer.status_code == 200, answer.text
    return answer.content


def test_eight_agents_work_through_a_queue_of_repository_jobs(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    datas = [f"input {n}\n".encode() * (n + 1) for n in range(24)]
    ids = manager.submit(*[
        {"command": f"{WORK} {n} 0.4", "repositories": [software.repository()],
         "inputs": [upload_input(manager, datas[n])], "outputs": ["result.txt"]}
        for n in range(24)
    ])  # fmt: skip
    with fleet(manager, tmp_path / "agents", software) as agents:
        started = [agents.start(f"agent{i}") for i in range(8)]
        jobs = wait_finished(manager, ids)
        assert [a.exit_status() for a in started] == [0] * 8  # each leaves once idle
    for n, job_id in enumerate(ids):
        job = jobs[job_id]
        assert job["state"] == "done", job
        assert job["exit_code"] == 0 and job["attempts"] == 1
        assert hashes(job) == {"result.txt": sha(result_of(n, datas[n]))}
        assert output(manager, job_id, "result.txt") == result_of(n, datas[n])
        assert len(stored(manager, job_id)) == 1
    assert len({j["agent"] for j in jobs.values()}) > 1
    log = started[0].text()
    assert "copilot job" in log and "no work for" in log


def test_a_job_of_an_agent_killed_mid_job_is_finished_by_another_once(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    [job_id] = manager.submit({"command": f"{WORK} 7 3", "repositories": [software.repository()],
                               "outputs": ["result.txt"], "lease_s": 6})  # fmt: skip
    with fleet(manager, tmp_path / "agents", software) as agents:
        first = agents.start("first", idle_exit=600)
        first.wait_for(f"copilot job {job_id} start")
        until("the job running", lambda: processes_under(first.work))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        # its job dies with it (PR_SET_PDEATHSIG), not to run on unseen
        until("the orphaned job gone", lambda: not processes_under(first.work), 10)
        second = agents.start("second")
        job = wait_finished(manager, [job_id], timeout=90)[job_id]
        assert second.exit_status() == 0
    assert job["state"] == "done" and job["agent"] == "second" and job["attempts"] == 2
    assert output(manager, job_id, "result.txt") == result_of(7)
    assert len(stored(manager, job_id)) == 1


def test_jobs_that_cannot_be_prepared_are_reported_failed_and_never_run(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    served = requests.get(f"{software.url}/whitelist", timeout=10)
    assert served.status_code == 200
    wrong = {"name": "in.txt", "url": f"{software.url}/whitelist",
             "sha256": sha(b"what the submitter meant"), "size": len(served.content)}  # fmt: skip
    ids = manager.submit(
        {"command": f"touch {ran}", "inputs": [wrong]},
        {"command": f"touch {ran}", "repositories": [software.repository("other.example.org")]},
        {"command": f"touch {ran}", "repositories": [software.repository(paths=("/sw/nope",))]},
    )
    with fleet(manager, tmp_path / "agents", software) as agents:
        agent = agents.start("agent")
        jobs = wait_finished(manager, ids)
        assert agent.exit_status() == 0
    assert not ran.exists()
    assert [jobs[i]["state"] for i in ids] == ["failed"] * 3
    assert [jobs[i]["exit_code"] for i in ids] == [EXIT_NOT_RUN] * 3
    messages = [jobs[i]["message"] for i in ids]
    assert "input in.txt: SHA-256" in messages[0] and "is not the job's" in messages[0]
    assert f"repository other.example.org is not mounted at {software.cvmfs_root}" in messages[1]
    assert f"repository {REPO} has no /sw/nope" in messages[2]


def test_a_failing_command_is_failed_with_its_exit_code(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    ids = manager.submit(
        {"command": "echo partial > result.txt; exit 3", "outputs": ["result.txt"]},
        {"command": "kill -TERM $$"},
        {"command": "true", "outputs": ["never-written.txt"]},
    )
    with fleet(manager, tmp_path / "agents", software) as agents:
        agent = agents.start("agent")
        jobs = wait_finished(manager, ids)
        assert agent.exit_status() == 0
    failed, killed, missing = (jobs[i] for i in ids)
    assert (failed["state"], failed["exit_code"]) == ("failed", 3)
    assert hashes(failed) == {"result.txt": sha(b"partial\n")}  # kept, to see why
    assert (killed["state"], killed["exit_code"]) == ("failed", 128 + signal.SIGTERM)
    assert (missing["state"], missing["exit_code"]) == ("failed", 0)
    assert "output never-written.txt is missing" in missing["message"]


def test_an_upload_cut_off_by_a_manager_restart_is_sent_again(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    size = 128 << 20
    [job_id] = manager.submit(
        {"command": f"head -c {size} /dev/urandom > big.bin", "outputs": ["big.bin"]}
    )
    incoming = Path(manager.outputs) / ".incoming"
    with fleet(manager, tmp_path / "agents", software) as agents:
        agent = agents.start("agent", idle_exit=10)
        agent.wait_for(f"copilot job {job_id} uploading big.bin")
        # The manager dies with part of the upload in its staging area.
        until("the upload under way", lambda: any(p.stat().st_size for p in incoming.iterdir()),
              timeout=30)  # fmt: skip
        killed = {p.name for p in incoming.iterdir()}
        manager.stop(signal.SIGKILL)
        agent.wait_for("upload of big.bin: PUT")
        manager.start()
        # the dead manager's staging file is swept when the next one starts
        assert not killed & {p.name for p in incoming.iterdir()}
        job = wait_finished(manager, [job_id])[job_id]
        assert agent.exit_status() == 0
    assert job["state"] == "done", job
    data = output(manager, job_id, "big.bin")
    assert len(data) == size and hashes(job) == {"big.bin": sha(data)}
    assert len(stored(manager, job_id)) == 1


def test_a_job_whose_lease_is_lost_is_killed_and_abandoned(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    [job_id] = manager.submit(
        {"command": 'echo 0.5 > "$CVM_PROGRESS_FILE"; sleep 600', "lease_s": 6}
    )
    with fleet(manager, tmp_path / "agents", software) as agents:
        agent = agents.start("agent")
        # the progress the job wrote reaches the manager with a heartbeat
        until("progress 0.5", lambda: manager.job(job_id)["progress"] == 0.5, 30)
        answer = manager.submitter("POST", f"/jobs/{job_id}/cancel")
        assert answer.status_code == 200, answer.text
        agent.wait_for(f"copilot job {job_id} abandoned: the lease is lost")
        assert not processes_under(agent.work)  # the job's process group is gone
        assert agent.exit_status() == 0
    assert manager.job(job_id)["state"] == "cancelled"


def test_an_agent_sent_to_another_manager_by_a_redirect_follows_it(
    manager: Manager, software: Software, tmp_path: Path
) -> None:
    [job_id] = manager.submit({"command": f"{WORK} 3", "outputs": ["result.txt"]})
    # The front manager's own queue is empty: only the redirect leads to the job.
    with redis_server(tmp_path / "empty-redis") as empty:
        front = Manager(empty, tmp_path / "front", str(tmp_path / "front-outputs"),
                        ["--redirect-agents", manager.url])  # fmt: skip
        shutil.copytree(manager.tokens, front.tokens)  # one token store for both
        front.agent_token, front.submitter_token = manager.agent_token, manager.submitter_token
        try:
            front.start()
            with fleet(front, tmp_path / "agents", software) as agents:
                agent = agents.start("agent")
                job = wait_finished(manager, [job_id])[job_id]
                assert agent.exit_status() == 0
        finally:
            front.stop()
    assert job["state"] == "done" and job["agent"] == "agent"
    assert output(manager, job_id, "result.txt") == result_of(3)


@pytest.mark.parametrize("token", ["not-a-token", "submitter"])
def test_an_agent_with_a_bad_token_stops_with_one_clear_line(
    manager: Manager, software: Software, tmp_path: Path, token: str
) -> None:
    token_file = tmp_path / "bad.token"
    token_file.write_text(manager.submitter_token if token == "submitter" else token)
    with fleet(manager, tmp_path / "agents", software) as agents:
        agent = agents.start("agent", idle_exit=600, token_file=token_file)
        assert agent.exit_status(timeout=30) == 2
    lines = agent.text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("copilot-agent: error: the manager refused this agent's token")
    assert ("401" if token != "submitter" else "403") in lines[0]


def test_in_the_appliance_a_refused_token_is_an_error_line_and_exit_2(
    manager: Manager, tmp_path: Path
) -> None:
    config = AgentConfig(manager.url, "not-a-token", str(tmp_path / "work"), "vm", 600.0)
    said: list[str] = []
    status = run_in_appliance(config, lambda repo, path: None, said.append, str(tmp_path / "p"))
    assert status == 2
    assert len(said) == 1 and said[0].startswith("error: copilot: the manager refused")


# -- the appliance under QEMU ----------------------------------------------------------


@pytest.fixture(scope="session")
def appliance_image(request: pytest.FixtureRequest) -> Path:
    """The default recipe as qcow2: the session's build, or CVMBUILD_TEST_QCOW2 (an image
    built from this tree) to try guest agent changes without building every format."""
    prebuilt = os.environ.get("CVMBUILD_TEST_QCOW2")
    return Path(prebuilt) if prebuilt else Path(request.getfixturevalue("thin_qcow2"))


@pytest.mark.slow
def test_an_appliance_pulls_jobs_from_the_manager_until_idle(
    manager: Manager, software: Software, served_repository: Served, appliance_image: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    guest = {**software.repository(), "url": software.url.replace("127.0.0.1", "10.0.2.2")}
    data = b"an input the appliance fetches from the manager\n"
    ids = manager.submit(
        {"command": f"{WORK} 1 8", "repositories": [guest], "inputs": [upload_input(manager, data)],
         "outputs": ["result.txt"], "lease_s": 9},
        {"command": f"{WORK} 2", "repositories": [guest], "outputs": ["result.txt"]},
    )  # fmt: skip
    port = manager.url.rsplit(":", 1)[1]
    user_data = served_repository.user_data("") + (
        f'[copilot]\nurl = "http://10.0.2.2:{port}"\ntoken = "{manager.agent_token}"\n'
        'idle_exit_s = "10"\nname = "appliance"\n'
    )
    (tmp_path / "slot").mkdir()
    vm = Vm(tmp_path / "slot", appliance_image, memory_mb=512, cpus=1, network=True,
            output_disk_mb=64)  # fmt: skip
    try:
        vm.prepare(user_data, {})
        vm.start()
        watch = Console(vm)
        assert watch.until_exited(timeout=400) == 0, watch.tail()
    finally:
        vm.kill()
    jobs = {i: manager.job(i) for i in ids}
    assert [j["state"] for j in jobs.values()] == ["done", "done"], jobs
    assert {j["agent"] for j in jobs.values()} == {"appliance"}
    assert hashes(jobs[ids[0]]) == {"result.txt": sha(result_of(1, data))}
    assert output(manager, ids[1], "result.txt") == result_of(2)
    said = [line[line.index("CVMAPPLIANCE:") :] for line in watch.lines if "CVMAPPLIANCE:" in line]
    assert f"CVMAPPLIANCE: mounted {REPO} revision 1 at /cvmfs/{REPO}" in said
    for job_id in ids:
        assert f"CVMAPPLIANCE: copilot job {job_id} start" in said
        assert f"CVMAPPLIANCE: copilot job {job_id} exit 0" in said
    assert any(line.startswith("CVMAPPLIANCE: progress ") for line in said)
    assert any(line.startswith("CVMAPPLIANCE: job exit 0 after") for line in said)
