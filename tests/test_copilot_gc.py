"""`copilot-manager gc` as an operator runs it against a live manager: uploads no job can
use go, what a job kept stays, files of jobs the Redis does not know are only reported,
and old finished jobs are forgotten only when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from tests.copilot_fixtures import Manager, get_job, until
from tests.test_copilot_manager import finish, sha, stored_files


def upload(manager: Manager, job_id: str, lease: str, data: bytes) -> None:
    url = f"{manager.url}/copilot/v1/jobs/{job_id}/outputs/out"
    put = requests.put(
        url, data=data, headers={"X-Copilot-Lease": lease, "X-Content-SHA256": sha(data)},
        timeout=30,
    )  # fmt: skip
    assert put.status_code == 201, put.text


def gc(manager: Manager, *args: str) -> dict[str, Any]:
    out = manager.cli(
        "gc", "--redis", manager.redis.url, "--outputs", manager.outputs, "--json", *args
    )
    return dict(json.loads(out.stdout))


def test_gc_deletes_only_uploads_no_job_can_use_and_forgets_old_jobs_when_asked(
    manager: Manager, tmp_path: Path
) -> None:
    data = tmp_path / "events.txt"
    data.write_bytes(b"muon\n")
    (done,) = (
        manager.cli("submit", "--command", "c", "--output", "out", "--input", str(data))
        .stdout.decode()
        .split()
    )
    # Only the vanishing job has a short lease: it fails, never comes back to the queue.
    running, vanished, retried, cancelled = manager.submit(
        {"command": "d", "outputs": ["out"]},
        {"command": "a", "outputs": ["out"], "lease_s": 5, "max_attempts": 1},
        {"command": "e", "outputs": ["out"]},
        {"command": "b", "outputs": ["out"]},
    )
    job, lease = get_job(manager)
    assert finish(manager, job, lease, {"out": b"c1"}).json() == {"state": "done"}
    for job_id, payload in (
        (running, b"d1"), (vanished, b"a1"), (retried, b"e1"), (cancelled, b"b1")
    ):  # fmt: skip
        job, lease = get_job(manager)
        assert job["id"] == job_id
        upload(manager, job_id, lease, payload)
    manager.cli("cancel", cancelled)
    manager.cli("requeue", retried)
    job, _ = get_job(manager, "second")
    assert job["id"] == retried and job["attempt"] == 1  # its first upload is now stale
    until("the vanished job fails", lambda: manager.status()["counts"]["failed"] == 1, 30)
    unknown = Path(manager.outputs, "jobs", "999", "somelease", "out")
    unknown.parent.mkdir(parents=True)
    unknown.write_bytes(b"another manager's")
    orphan = manager.submitter(
        "PUT",
        f"/inputs/{sha(b'orphan')}",
        data=b"orphan",
        headers={"X-Content-SHA256": sha(b"orphan")},
    )
    assert orphan.status_code in (200, 201), orphan.text
    before = stored_files(manager)
    assert sorted(v for k, v in before.items() if k.startswith("jobs/")) == sorted(
        [b"a1", b"e1", b"b1", b"c1", b"d1", b"another manager's"]
    )

    dry = gc(manager, "--dry-run")
    assert dry["stale_uploads"] == 3 and dry["unused_inputs"] == 0  # inputs get a day's grace
    assert dry["unknown_jobs"] == ["999"] and dry["forgotten_jobs"] == 0
    assert stored_files(manager) == before

    found = gc(manager, "--input-grace-hours", "0")
    assert found["stale_uploads"] == 3 and found["unused_inputs"] == 1
    after = stored_files(manager)
    assert sorted(v for k, v in after.items() if k.startswith("jobs/")) == sorted(
        [b"c1", b"d1", b"another manager's"]
    )
    assert [v for k, v in after.items() if k.startswith("inputs/")] == [b"muon\n"]
    assert manager.submitter("GET", f"/jobs/{done}/outputs/out").content == b"c1"

    forgot = gc(manager, "--forget-finished-days", "0")
    assert forgot["forgotten_jobs"] == 3  # done, failed, cancelled; the running two stay
    assert manager.submitter("GET", f"/jobs/{done}").status_code == 404
    counts = manager.status()["counts"]
    assert counts == {"queued": 0, "running": 2, "done": 0, "failed": 0, "cancelled": 0}
    left = sorted(v for k, v in stored_files(manager).items() if k.startswith("jobs/"))
    assert left == [b"another manager's", b"d1"]
    text = manager.cli(
        "gc", "--redis", manager.redis.url, "--outputs", manager.outputs
    ).stdout.decode()
    assert "kept 1 files of 1 jobs this Redis does not hold (e.g. 999)" in text


def test_gc_of_an_unreachable_redis_is_one_line(manager: Manager, tmp_path: Path) -> None:
    out = manager.cli(
        "gc", "--redis", f"unix://{tmp_path}/none.sock", "--outputs", manager.outputs,
        check=False,
    )  # fmt: skip
    err = out.stderr.decode()
    assert (
        out.returncode == 1 and err.startswith("error: Redis at unix://") and err.count("\n") == 1
    )
