"""The Co-Pilot manager as its operators, submitters and agents meet it: a real
redis-server (appendonly, fsync always), the manager run by its CLI on loopback, and
plain HTTP requests playing the agent, exactly as protocol v1 (docs/COPILOT.md) says.
Processes are killed and restarted to show that nothing acknowledged is lost."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from redis import Redis

from tests.copilot_fixtures import API, BIN, Manager, RedisServer, get_job, manager_process, until
from tests.test_s3 import endpoint  # noqa: F401 (the moto server fixture)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finish(
    manager: Manager, job: dict[str, Any], lease: str, outputs: dict[str, bytes], code: int = 0
) -> requests.Response:
    """What an agent does once its command has run: ask where outputs go, upload each
    with its hash, report the exit code."""
    where = manager.agent("POST", f"/jobs/{job['id']}/output-location", json={"lease": lease})
    assert where.status_code == 200, where.text
    for upload in where.json()["uploads"]:
        data = outputs[upload["name"]]
        headers = {"X-Copilot-Lease": lease, "X-Content-SHA256": sha(data)}
        put = requests.put(upload["url"], data=data, headers=headers, timeout=30)
        assert put.status_code == 201, put.text
    hashes = {name: sha(data) for name, data in outputs.items()}
    return manager.agent(
        "POST",
        f"/jobs/{job['id']}/done",
        json={"lease": lease, "exit_code": code, "outputs": hashes},
    )


def stored_files(manager: Manager) -> dict[str, bytes]:
    """Every output file in the manager's output directory, staging area included."""
    root = Path(manager.outputs)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def is_one_line_error(response: requests.Response) -> bool:
    body = response.json()
    return list(body) == ["error"] and "\n" not in body["error"] and len(body["error"]) > 10


# -- the protocol's happy path --------------------------------------------------------


def test_a_submitted_job_runs_its_input_and_its_output_is_kept(
    manager: Manager, tmp_path: Path
) -> None:
    data = tmp_path / "events.txt"
    data.write_bytes(b"muon jet track\n" * 1000)
    out = manager.cli(
        "submit", "--command", "wc -w < events.txt > count.txt", "--input", str(data),
        "--output", "count.txt", "--env", "MODE=fast", "--lease-s", "60",
    )  # fmt: skip
    (job_id,) = out.stdout.decode().split()

    answer = manager.agent(
        "POST",
        "/jobs/get",
        json={"agent": "vm-1", "resources": {"cpus": 2, "memory_mb": 2048, "disk_mb": 4096}},
    )
    assert answer.status_code == 200
    assert 0 <= float(answer.headers["Server-Timing"].removeprefix("app;dur=")) < 30_000
    job, lease = answer.json()["job"], answer.json()["lease"]
    assert job["id"] == job_id and job["command"] == "wc -w < events.txt > count.txt"
    assert job["environment"] == {"MODE": "fast"} and job["outputs"] == ["count.txt"]
    assert lease["expires_in_s"] == 60 and job["lease_s"] == 60
    (item,) = job["inputs"]
    assert item["name"] == "events.txt" and item["size"] == data.stat().st_size
    fetched = requests.get(item["url"], timeout=30)  # served by the manager, no token needed
    assert fetched.content == data.read_bytes() and sha(fetched.content) == item["sha256"]

    beat = manager.agent(
        "POST", f"/jobs/{job_id}/heartbeat", json={"lease": lease["id"], "progress": 0.5}
    )
    assert beat.json() == {"expires_in_s": 60}
    running = manager.job(job_id)
    assert running["state"] == "running" and running["agent"] == "vm-1"
    assert running["progress"] == 0.5 and 0 < running["lease_expires_in_s"] <= 60

    done = finish(manager, job, lease["id"], {"count.txt": b"3000\n"})
    assert done.status_code == 200 and done.json() == {"state": "done"}

    final = manager.job(job_id)
    assert final["state"] == "done" and final["exit_code"] == 0 and final["attempts"] == 1
    assert final["outputs"] == {"count.txt": {"sha256": sha(b"3000\n"), "size": 5}}
    output = manager.submitter("GET", f"/jobs/{job_id}/outputs/count.txt")
    assert output.content == b"3000\n"
    shown = manager.cli("status", job_id).stdout.decode()
    assert f"job {job_id}: done, attempt 1 of 3, agent vm-1\n" in shown
    assert f"output count.txt\t5\t{final['outputs']['count.txt']['sha256']}\n" in shown
    # The agent's report lost on the way and sent again: the same answer, nothing changed.
    again = manager.agent(
        "POST", f"/jobs/{job_id}/done", json={"lease": lease["id"], "exit_code": 1}
    )
    assert again.json() == {"state": "done"} and manager.job(job_id) == final

    idle = manager.agent("POST", "/jobs/get", json={"agent": "vm-1"})
    assert idle.status_code == 204 and idle.headers["Retry-After"] == "1"
    status = json.loads(manager.cli("status", "--json").stdout)
    assert status["counts"] == {"queued": 0, "running": 0, "done": 1, "failed": 0, "cancelled": 0}
    assert [a["name"] for a in status["agents"]] == ["vm-1"] and status["expiring"] == []
    # an agent last seen 8 days ago is forgotten: the set would grow with every volunteer
    with Redis(unix_socket_path=str(manager.redis.socket)) as db:
        db.zadd("copilot:agents", {"vm-old": (time.time() - 8 * 86400) * 1000})
    assert [a["name"] for a in manager.status()["agents"]] == ["vm-1"]


def test_a_failing_command_or_a_missing_output_fails_the_job(manager: Manager) -> None:
    ids = manager.submit(
        {"command": "false", "outputs": ["r"]}, {"command": "true", "outputs": ["r"]}
    )
    job, lease = get_job(manager)
    assert finish(manager, job, lease, {"r": b"x"}, code=3).json() == {"state": "failed"}
    job, lease = get_job(manager)
    answer = manager.agent(
        "POST", f"/jobs/{job['id']}/done", json={"lease": lease, "exit_code": 0, "outputs": {}}
    )
    assert answer.json() == {"state": "failed"}
    first, second = manager.job(ids[0]), manager.job(ids[1])
    assert first["exit_code"] == 3 and first["outputs"] == {"r": {"sha256": sha(b"x"), "size": 1}}
    assert second["message"] == "r was not uploaded"


def test_a_job_from_flags_names_its_repository(manager: Manager, tmp_path: Path) -> None:
    key = tmp_path / "sw.example.org.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n")
    out = manager.cli(
        "submit", "--command", "hello.py", "--repository", "http://repo.example.org/sw",
        "--key", str(key), "--repo-path", "/sw/hello/1.0", "--max-attempts", "2",
    )  # fmt: skip
    job, _ = get_job(manager)
    assert job["id"] == out.stdout.decode().strip() and job["max_attempts"] == 2
    assert job["repositories"] == [
        {
            "name": "sw.example.org",
            "url": "http://repo.example.org/sw",
            "public_key": key.read_text(),
            "paths": ["/sw/hello/1.0"],
        }
    ]
    bad = manager.cli("submit", "--command", "x", "--input", str(tmp_path / "nope"), check=False)
    assert (
        bad.returncode == 1
        and bad.stderr.decode() == f"error: input {tmp_path}/nope: no such file\n"
    )


def test_a_job_file_in_toml_submits_several_jobs(manager: Manager, tmp_path: Path) -> None:
    (tmp_path / "in.dat").write_bytes(b"calibration")
    (tmp_path / "jobs.toml").write_text(
        '[[jobs]]\ncommand = "cat in.dat"\ninputs = [{path = "in.dat"}]\n'
        '[[jobs]]\ncommand = "echo 2"\nmax_attempts = 5\nresources = {cpus = 4}\n'
        '[[jobs.inputs]]\nname = "remote.dat"\nurl = "http://example.org/remote.dat"\n'
        f'sha256 = "{sha(b"r")}"\nsize = 1\n'
    )
    ids = json.loads(manager.cli("submit", str(tmp_path / "jobs.toml"), "--json").stdout)["ids"]
    assert len(ids) == 2
    assert manager.job(ids[1])["max_attempts"] == 5
    # The second needs 4 cpus: an agent offering 1 gets the first only.
    job, _ = get_job(manager, "small", cpus=1)
    assert job["id"] == ids[0] and job["inputs"][0]["sha256"] == sha(b"calibration")
    assert (
        manager.agent(
            "POST", "/jobs/get", json={"agent": "small", "resources": {"cpus": 1}}
        ).status_code
        == 204
    )
    job, _ = get_job(manager, "big", cpus=4)
    assert job["id"] == ids[1] and job["inputs"][0]["url"] == "http://example.org/remote.dat"


# -- tokens and errors --------------------------------------------------------------


def test_a_bad_token_is_401_and_a_token_of_the_wrong_kind_403(manager: Manager) -> None:
    get = "/jobs/get"
    for answer in (
        requests.post(manager.url + API + get, json={"agent": "a"}, timeout=10),
        manager.call("cvmt_not-a-token", "POST", get, json={"agent": "a"}),
        manager.call("cvmt_not-a-token", "GET", "/status"),
    ):
        assert answer.status_code == 401 and is_one_line_error(answer)
    for answer in (
        manager.submitter("POST", get, json={"agent": "a"}),
        manager.agent("GET", "/status"),
        manager.agent("POST", "/jobs", json={"command": "true"}),
    ):
        assert answer.status_code == 403 and is_one_line_error(answer)
    assert requests.get(manager.url + API + "/health", timeout=10).json() == {"redis": "ok"}
    bad = manager.submitter("POST", "/jobs", json={"command": "true", "outputs": ["../x"]})
    assert bad.status_code == 400 and is_one_line_error(bad)
    huge = manager.agent("POST", get, data=b"{" + b" " * (2 << 20) + b"}")
    assert huge.status_code == 413 and is_one_line_error(huge)
    nowhere = manager.agent("GET", "/jobs/1/nothing")
    assert nowhere.status_code == 404 and is_one_line_error(nowhere)

    revoked = manager.cli(
        "token",
        "revoke",
        "--tokens",
        str(manager.tokens),
        "--role",
        "submitter",
        "--name",
        "operator",
    )
    assert revoked.returncode == 0
    refused = manager.cli("status", check=False)
    assert refused.returncode == 1
    assert refused.stderr.decode().startswith("error: ") and "401" in refused.stderr.decode()


def test_a_draining_manager_redirects_agents(
    redis: RedisServer, manager: Manager, tmp_path: Path
) -> None:
    with manager_process(redis, tmp_path / "old", None, "--redirect-agents", manager.url) as old:
        answer = old.agent("POST", "/jobs/get", json={"agent": "a"}, allow_redirects=False)
        assert answer.status_code == 307
        assert answer.headers["location"] == manager.url + API + "/jobs/get"


# -- leases -------------------------------------------------------------------------


def test_an_expired_lease_gives_the_job_to_another_agent_and_refuses_the_first(
    manager: Manager,
) -> None:
    (job_id,) = manager.submit({"command": "run", "outputs": ["out"], "lease_s": 5})
    job, first = get_job(manager, "vanishing")
    where = manager.agent("POST", f"/jobs/{job_id}/output-location", json={"lease": first})
    url = where.json()["uploads"][0]["url"]
    early = requests.put(
        url,
        data=b"first",
        headers={"X-Copilot-Lease": first, "X-Content-SHA256": sha(b"first")},
        timeout=10,
    )
    assert early.status_code == 201  # while its lease was current

    def taken_by_second() -> tuple[dict[str, Any], str] | None:
        answer = manager.agent("POST", "/jobs/get", json={"agent": "second", "resources": {}})
        return (
            (answer.json()["job"], answer.json()["lease"]["id"])
            if answer.status_code == 200
            else None
        )

    job2, second = until("the lease expires and the job is handed out again", taken_by_second, 30)
    assert job2["id"] == job_id and job2["attempt"] == 2

    late = [
        manager.agent("POST", f"/jobs/{job_id}/heartbeat", json={"lease": first}),
        requests.put(
            url,
            data=b"late",
            headers={"X-Copilot-Lease": first, "X-Content-SHA256": sha(b"late")},
            timeout=10,
        ),
        manager.agent(
            "POST",
            f"/jobs/{job_id}/done",
            json={"lease": first, "exit_code": 0, "outputs": {"out": sha(b"first")}},
        ),
    ]
    assert [a.status_code for a in late] == [409, 409, 409]
    assert all(is_one_line_error(a) for a in late)
    assert manager.job(job_id)["state"] == "running"

    assert finish(manager, job2, second, {"out": b"second"}).json() == {"state": "done"}
    final = manager.job(job_id)
    assert final["agent"] == "second" and final["attempts"] == 2
    assert manager.submitter("GET", f"/jobs/{job_id}/outputs/out").content == b"second"
    # Only the second's bytes are kept: the first's upload was removed once the job was done.
    assert list(stored_files(manager).values()) == [b"second"]


def test_a_job_whose_agents_keep_vanishing_fails_after_max_attempts(manager: Manager) -> None:
    (job_id,) = manager.submit({"command": "run", "lease_s": 5, "max_attempts": 1})
    get_job(manager, "vm-7")
    (soon,) = manager.status()["expiring"]
    assert soon["id"] == job_id and soon["agent"] == "vm-7" and 0 < soon["expires_in_s"] <= 5
    until(
        "the job fails once its only lease expired",
        lambda: manager.status()["counts"]["failed"] == 1,
        30,
    )
    job = manager.job(job_id)
    assert job["state"] == "failed" and "lease expired" in job["message"]


def test_a_cut_upload_or_one_with_a_wrong_hash_stores_nothing(manager: Manager) -> None:
    (job_id,) = manager.submit({"command": "run", "outputs": ["big"]})
    job, lease = get_job(manager)
    url = f"{manager.url}{API}/jobs/{job_id}/outputs/big"
    data = os.urandom(1 << 20)

    wrong = requests.put(
        url,
        data=data,
        headers={"X-Copilot-Lease": lease, "X-Content-SHA256": sha(b"other")},
        timeout=30,
    )
    assert wrong.status_code == 400 and is_one_line_error(wrong)

    staging = Path(manager.outputs) / ".incoming"
    with socket.create_connection(("127.0.0.1", manager.port)) as conn:
        head = (
            f"PUT {API}/jobs/{job_id}/outputs/big HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(data)}\r\nX-Copilot-Lease: {lease}\r\n"
            f"X-Content-SHA256: {sha(data)}\r\n\r\n"
        )
        conn.sendall(head.encode() + data[: len(data) // 3])
        until("the manager stages the upload", lambda: any(staging.iterdir()))
    # Cut: the manager drops what it staged; nothing is stored.
    until("the staged part is removed", lambda: not any(staging.iterdir()))
    assert stored_files(manager) == {}
    answer = manager.agent(
        "POST",
        f"/jobs/{job_id}/done",
        json={"lease": lease, "exit_code": 0, "outputs": {"big": sha(data)}},
    )
    assert answer.json() == {"state": "failed"}
    assert manager.job(job_id)["message"] == "big was not uploaded"


# -- several managers, crashes, restarts ------------------------------------------------


def test_two_managers_on_one_redis_never_hand_out_a_job_twice(
    redis: RedisServer, manager: Manager, tmp_path: Path
) -> None:
    ids = manager.submit(*({"command": f"job {i}"} for i in range(300)))
    with manager_process(redis, tmp_path / "second", tokens_of=manager) as other:
        handed: list[str] = []
        lock = threading.Lock()

        def agent(n: int) -> None:
            target = (manager, other)[n % 2]
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {manager.agent_token}"
            while True:
                answer = session.post(
                    f"{target.url}{API}/jobs/get", json={"agent": f"a{n}"}, timeout=60
                )
                if answer.status_code == 204:
                    return
                assert answer.status_code == 200, answer.text
                with lock:
                    handed.append(answer.json()["job"]["id"])

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert sorted(handed, key=int) == ids  # every job once, none twice
    assert manager.status()["counts"]["running"] == 300


def test_a_fleet_larger_than_the_redis_connection_pool_is_served_not_refused(
    manager: Manager,
) -> None:
    """250 agents' requests in flight at once: each waits for a Redis connection
    rather than failing with 503 (redis-py's asyncio pool refuses beyond 100)."""
    fleet = 250
    ids = manager.submit(*({"command": f"job {i}"} for i in range(fleet)))
    host, port = manager.url.removeprefix("http://").split(":")
    connections = [http.client.HTTPConnection(host, int(port), timeout=120) for _ in range(fleet)]
    headers = {"Authorization": f"Bearer {manager.agent_token}",
               "Content-Type": "application/json"}  # fmt: skip
    for n, connection in enumerate(connections):  # every request sent before any answer
        body = json.dumps({"agent": f"a{n}"}).encode()
        connection.request("POST", f"{API}/jobs/get", body=body, headers=headers)
    answers = [connection.getresponse() for connection in connections]
    statuses = [answer.status for answer in answers]
    refused = [answer.read() for answer in answers if answer.status != 200]
    for connection in connections:
        connection.close()
    assert statuses.count(200) == fleet, refused[:3]
    assert manager.status()["counts"]["running"] == len(ids)


def submitting(
    manager: Manager, acknowledged: list[str], stop: threading.Event
) -> threading.Thread:
    """A submitter sending jobs one by one, keeping the ids the manager acknowledged;
    failures while the manager or Redis is down are expected and retried."""

    def run() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {manager.submitter_token}"
        n = 0
        while not stop.is_set():
            try:
                answer = session.post(
                    f"{manager.url}{API}/jobs", json={"command": f"echo {n}"}, timeout=10
                )
            except requests.RequestException:
                time.sleep(0.05)
                continue
            if answer.status_code == 201:
                acknowledged.extend(answer.json()["ids"])
                n += 1
            else:
                time.sleep(0.05)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_manager_killed_mid_run_loses_nothing_acknowledged(manager: Manager) -> None:
    (leased_id,) = manager.submit({"command": "long", "lease_s": 600})
    job, lease = get_job(manager)
    acknowledged: list[str] = []
    stop = threading.Event()
    thread = submitting(manager, acknowledged, stop)
    try:
        until("some jobs are acknowledged", lambda: len(acknowledged) >= 20)
        manager.restart(signal.SIGKILL)
        before = len(acknowledged)
        until("submissions go on after the restart", lambda: len(acknowledged) >= before + 20)
    finally:
        stop.set()
        thread.join(timeout=30)
    for job_id in acknowledged:
        assert manager.job(job_id)["state"] == "queued"
    # One submission may have been queued while its answer was lost with the manager.
    assert 0 <= manager.status()["counts"]["queued"] - len(acknowledged) <= 1
    # The agent that held a lease across the restart carries on.
    beat = manager.agent("POST", f"/jobs/{leased_id}/heartbeat", json={"lease": lease})
    assert beat.status_code == 200
    assert finish(manager, job, lease, {}).json() == {"state": "done"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_redis_restarted_mid_run_loses_nothing_acknowledged(
    redis: RedisServer, manager: Manager, sig: int
) -> None:
    ids = manager.submit({"command": "a", "outputs": ["o"]}, {"command": "b"}, {"command": "c"})
    job, lease = get_job(manager)
    assert finish(manager, job, lease, {"o": b"kept"}).json() == {"state": "done"}
    job_b, lease_b = get_job(manager)
    acknowledged: list[str] = []
    stop = threading.Event()
    thread = submitting(manager, acknowledged, stop)
    try:
        until("some jobs are acknowledged", lambda: len(acknowledged) >= 20)
        redis.stop(sig)
        health = requests.get(manager.url + API + "/health", timeout=30)
        assert health.status_code == 503 and is_one_line_error(health)
        down = manager.agent("POST", "/jobs/get", json={"agent": "a"})
        assert down.status_code == 503 and is_one_line_error(down)
        redis.start()
        before = len(acknowledged)
        until("submissions go on after Redis is back", lambda: len(acknowledged) >= before + 20)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert manager.job(ids[0])["state"] == "done"
    assert manager.submitter("GET", f"/jobs/{ids[0]}/outputs/o").content == b"kept"
    assert manager.job(ids[1])["state"] == "running"
    assert (
        manager.agent("POST", f"/jobs/{ids[1]}/heartbeat", json={"lease": lease_b}).status_code
        == 200
    )
    for job_id in acknowledged:
        assert manager.job(job_id)["state"] == "queued"
    counts = manager.status()["counts"]
    # Job c, and perhaps one submission stored just before Redis died, its answer lost.
    assert 1 <= counts.pop("queued") - len(acknowledged) <= 2
    assert counts == {"running": 1, "done": 1, "failed": 0, "cancelled": 0}
    assert job_b["id"] == ids[1]


# -- operators: cancel, requeue, status ---------------------------------------------------


def test_a_submission_sent_again_with_its_key_queues_nothing_twice(manager: Manager) -> None:
    jobs = [{"command": "one"}, {"command": "two"}]
    key = {"Idempotency-Key": "batch-7"}
    first = manager.submitter("POST", "/jobs", json=jobs, headers=key)
    again = manager.submitter("POST", "/jobs", json=jobs, headers=key)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["ids"] == first.json()["ids"]
    assert manager.status()["counts"]["queued"] == 2
    other = manager.submitter("POST", "/jobs", json=[{"command": "three"}], headers=key)
    assert other.status_code == 409 and is_one_line_error(other)
    bad = manager.submitter("POST", "/jobs", json=jobs, headers={"Idempotency-Key": "a b"})
    assert bad.status_code == 400 and manager.status()["counts"]["queued"] == 2


class AnswerLosingProxy:
    """A TCP relay to the manager that, on its first connection, delivers the request and
    then drops the connection without the answer: a submission whose answer was lost."""

    def __init__(self, port: int):
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            if self.connections == 1:
                threading.Thread(target=self._lose_answer, args=(client, upstream)).start()
            else:
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    @staticmethod
    def _lose_answer(client: socket.socket, upstream: socket.socket) -> None:
        client.settimeout(1)
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
        upstream.settimeout(10)
        with contextlib.suppress(OSError):
            upstream.recv(65536)  # the manager answered: the jobs are queued
        client.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_a_submission_whose_answer_was_lost_is_sent_again_and_queued_once(
    manager: Manager,
) -> None:
    proxy = AnswerLosingProxy(manager.port)
    try:
        env = {**os.environ, "COPILOT_URL": f"http://127.0.0.1:{proxy.port}",
               "COPILOT_TOKEN": manager.submitter_token}  # fmt: skip
        out = subprocess.run(
            [str(BIN / "copilot-manager"), "submit", "--command", "simulate 1000 events"],
            capture_output=True, env=env, timeout=120,
        )  # fmt: skip
    finally:
        proxy.close()
    assert out.returncode == 0, out.stderr.decode()
    assert proxy.connections >= 2  # the answer was lost once and the submission sent again
    (job_id,) = out.stdout.decode().split()
    assert manager.status()["counts"]["queued"] == 1
    assert manager.job(job_id)["job"]["command"] == "simulate 1000 events"


def test_cancel_and_requeue(manager: Manager) -> None:
    queued, running, done = manager.submit({"command": "1"}, {"command": "2"}, {"command": "3"})
    out = manager.cli("cancel", queued)
    assert out.stdout.decode().strip() == f"job {queued}: queued -> cancelled"
    job, lease = get_job(manager)
    assert job["id"] == running  # the cancelled one is never handed out
    manager.cli("cancel", running)
    gone = manager.agent("POST", f"/jobs/{running}/heartbeat", json={"lease": lease})
    assert gone.status_code == 409
    job3, lease3 = get_job(manager)
    assert finish(manager, job3, lease3, {}).json() == {"state": "done"}

    again = manager.cli("cancel", done, check=False)
    assert again.returncode == 1 and again.stderr.decode() == (
        f"error: {manager.url} answered 409: job {done} is already done\n"
    )
    assert manager.cli("requeue", done, check=False).returncode == 1

    manager.cli("requeue", queued, running)
    assert manager.job(queued)["state"] == "queued" and manager.job(running)["attempts"] == 0
    text = manager.cli("status").stdout.decode()
    assert text.startswith("queued 2  running 0  done 1  failed 0  cancelled 0\n")
    handed = {get_job(manager)[0]["id"], get_job(manager)[0]["id"]}
    assert handed == {queued, running}
    status = manager.status()
    assert {e["id"] for e in status["expiring"]} == set()  # 300 s leases: none within 60 s
    assert manager.submitter("POST", "/jobs/999/cancel").status_code == 404


# -- outputs on S3 ------------------------------------------------------------------------


def test_outputs_stored_in_s3(
    redis: RedisServer,
    endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from repo_server.s3_storage import make_client

    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3 = make_client(endpoint)
    s3.create_bucket(Bucket="copilot-out")
    with manager_process(
        redis, tmp_path / "m", "s3://copilot-out/run1", "--endpoint-url", endpoint, **env
    ) as manager:
        (job_id,) = manager.submit({"command": "run", "outputs": ["result.root"]})
        job, lease = get_job(manager)
        data = os.urandom(9 << 20)  # a multipart upload
        assert finish(manager, job, lease, {"result.root": data}).json() == {"state": "done"}
        assert manager.submitter("GET", f"/jobs/{job_id}/outputs/result.root").content == data
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="copilot-out")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith(f"run1/jobs/{job_id}/")


def _workers_of(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in children.read_text().split()} if children.exists() else set()


def test_workers_share_one_port_and_a_dead_worker_is_replaced(
    redis: RedisServer, tmp_path: Path
) -> None:
    """`serve --workers 2`: two processes answer on the one port (the manager holds no
    state); a worker killed outright is replaced; stopping the manager stops them all."""
    with manager_process(redis, tmp_path / "m", None, "--workers", "2") as manager:
        assert manager.proc is not None
        parent = manager.proc.pid
        first = until("2 workers", lambda: (w := _workers_of(parent)) and len(w) == 2 and w)
        ids = manager.submit(*({"command": f"job {i}"} for i in range(20)))
        handed = [get_job(manager, f"a{i}")[0]["id"] for i in range(20)]
        assert sorted(handed, key=int) == ids
        os.kill(min(first), signal.SIGKILL)
        again = until(
            "a worker in place of the killed one",
            lambda: (w := _workers_of(parent)) and len(w) == 2 and w != first and w,
        )
        assert max(first) in again
        assert manager.agent("POST", "/jobs/get", json={"agent": "late"}).status_code == 204
    for pid in again:
        until(f"worker {pid} to stop", lambda pid=pid: not Path(f"/proc/{pid}").exists())
