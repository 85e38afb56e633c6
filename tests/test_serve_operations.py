"""Operating a running `repo-server serve`: its access and error logs, /health and
/metrics for monitoring, and the publish leases the operator lists and drops.

The story: an operator runs the server under systemd, reads its logs, points Prometheus
and a health check at it, and one day finds a publish stuck behind a dead publisher's
lease.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from calendar import timegm
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import requests

from cvmfs_format.objects import content_hash
from cvmfs_format.pack import API
from tests.conftest import BIN, Repo, run_cli, serving_process, stop
from tests.publish_api import Api, ObjectBag, make_token
from tests.test_expiry import expire_whitelist

ACCESS_LINE = re.compile(
    r"^(?P<client>\S+) - (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>\S+) (?P<target>\S+) HTTP/1\.1" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" (?P<seconds>\d+\.\d{3})$'
)
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
LEASES = f"{API}/leases"


def until(what: str, found: Callable[[], object], timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def access_log(path: Path, count: int) -> list[dict[str, str]]:
    """The parsed lines of an access log, once it has at least count (each request is
    logged as its response ends, so a client may read it first)."""

    def lines() -> list[dict[str, str]] | None:
        text = path.read_text() if path.exists() else ""
        parsed = []
        for line in text.splitlines():
            match = ACCESS_LINE.match(line)
            assert match, f"not an access log line: {line!r}"
            parsed.append(match.groupdict())
        return parsed if len(parsed) >= count else None

    return until(f"{count} lines in {path}", lines)  # type: ignore[return-value]


def logged_until(path: Path, target: str) -> list[dict[str, str]]:
    """The access log once its last line is a request for target."""

    def done() -> list[dict[str, str]] | None:
        lines = access_log(path, 1)
        return lines if lines[-1]["target"] == target else None

    return until(f"{target} in {path}", done)  # type: ignore[return-value]


def tiny_tree(root: Path, content: bytes = b"payload") -> Path:
    root.mkdir(parents=True)
    (root / "f").write_bytes(content)
    return root


def publish_http(src: Path, url: str, path: str, token: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli(
        "cvmbuild", "publish", src, "--repo", url, "--path", path,
        env={"CVMBUILD_TOKEN": token}, check=False,
    )  # fmt: skip


def test_the_access_log_names_the_token_status_bytes_and_time_of_each_request(
    repo: Repo, tmp_path: Path
) -> None:
    token = make_token(repo, "atlas-ci", "/sw")
    access, log = tmp_path / "access.log", tmp_path / "serve.log"
    with serving_process(repo.dir, log, "--access-log", str(access)) as (url, _):
        start = len(access_log(access, 1))  # the fixture's requests until it answered
        refused = requests.post(url + LEASES, json={"path": "/sw/1"}, headers={"User-Agent": "x"})
        assert refused.status_code == 401
        published = publish_http(tiny_tree(tmp_path / "src"), url, "/sw/1", token)
        assert published.returncode == 0, published.stderr.decode()
        manifest = requests.get(url + "/manifest")
        lines = logged_until(access, "/manifest")[start:]

    first, *publish, last = lines
    assert (first["method"], first["target"], first["status"]) == ("POST", LEASES, "401")
    assert first["user"] == "-" and first["agent"] == "x"
    assert int(first["bytes"]) == len(refused.content)
    assert first["client"] == "127.0.0.1"
    assert [(p["method"], p["status"]) for p in publish if p["target"] == LEASES] == [
        ("POST", "201")
    ]
    assert any(p["target"].endswith("/commit") and p["status"] == "200" for p in publish)
    assert all(p["user"] == "atlas-ci" for p in publish), publish
    assert (last["method"], last["target"], last["status"], last["user"]) == (
        "GET", "/manifest", "200", "-",
    )  # fmt: skip
    assert int(last["bytes"]) == len(manifest.content) == (repo.dir / "manifest").stat().st_size
    when = timegm(time.strptime(last["time"], "%d/%b/%Y:%H:%M:%S +0000"))
    assert abs(when - time.time()) < 120
    assert all(float(line["seconds"]) < 60 for line in lines)
    assert "/manifest" not in log.read_text()  # the access log went to its file only


def test_a_server_error_goes_to_the_error_log_with_its_traceback_and_a_utc_time(
    repo: Repo, tmp_path: Path
) -> None:
    content = b"a file whose object directory is broken"
    broken = repo.dir / "data" / content_hash(content)[:2]
    shutil.rmtree(broken)
    broken.write_bytes(b"an operator's mistake: a file where a directory belongs")
    token = make_token(repo, "atlas-ci", "/sw")
    access, log = tmp_path / "access.log", tmp_path / "serve.log"
    with serving_process(repo.dir, log, "--access-log", str(access)) as (url, _):
        failed = publish_http(tiny_tree(tmp_path / "src", content), url, "/sw/1", token)
        assert failed.returncode == 1
        reference = failed.stderr.decode().split("details under ")[1].split()[0]
        errors = until(
            "the 500 in the access log",
            lambda: [line for line in access_log(access, 1) if line["status"] == "500"],
        )

    logged = log.read_text()
    stamp = re.search(
        rf"^(\S+) ERROR repo_server\.api_errors: unexpected error {reference} ", logged, re.M
    )
    assert stamp and ISO_UTC.match(stamp.group(1)), logged
    assert "Traceback" in logged and "NotADirectoryError" in logged
    assert [(e["method"], e["user"]) for e in errors] == [("POST", "atlas-ci")]  # type: ignore[union-attr]
    assert errors[0]["target"].endswith("/objects")  # type: ignore[index]


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of the Prometheus text format by (name, labels); every one declared."""
    declared: set[str] = set()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert match, f"not a sample: {line!r}"
        name, labels, value = match.groups()
        pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or "")
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or base in declared, f"{name} has no # TYPE"
        samples[(name, frozenset(pairs))] = float(value)
    return samples


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(f"repo_server_{name}", frozenset(labels.items()))]


def test_health_and_metrics_report_the_revision_requests_bytes_and_publish_durations(
    repo: Repo, tmp_path: Path
) -> None:
    token = make_token(repo, "atlas-ci", "/sw")
    with serving_process(repo.dir, tmp_path / "serve.log") as (url, _):
        health = requests.get(url + "/health")
        assert health.status_code == 200, health.text
        assert health.json()["revision"] == 0 and health.json()["status"] == "ok"
        for version in ("1.0", "2.0"):
            src = tiny_tree(tmp_path / version, version.encode())
            assert publish_http(src, url, f"/sw/{version}", token).returncode == 0
        sent = sum(len(requests.get(f"{url}/{name}").content) for name in ("manifest", "whitelist"))

        health = requests.get(url + "/health")
        exposition = requests.get(url + "/metrics")

        body = health.json()
        assert health.status_code == 200 and body["revision"] == 2 and body["verified"] is True
        assert ISO_UTC.match(body["manifest_expires"]) and ISO_UTC.match(body["whitelist_expires"])
        assert exposition.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = parse_metrics(exposition.text)
        repository = {"repository": repo.name}
        assert sample(samples, "revision", **repository) == 2
        assert sample(samples, "head_ok", **repository) == 1
        expiry = datetime.fromisoformat(body["whitelist_expires"]).timestamp()
        assert sample(samples, "whitelist_expiry_timestamp_seconds", **repository) == expiry
        assert sample(samples, "http_requests_total", method="GET", status="200") >= 4
        assert sample(samples, "http_requests_total", method="POST", status="201") == 2  # leases
        assert sample(samples, "http_response_bytes_total") >= sent
        committed = {"outcome": "committed"}
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in samples.items()
            if name == "repo_server_publish_duration_seconds_bucket"
        )
        counts = [count for _, count in buckets]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), 2)
        assert sample(samples, "publish_duration_seconds_count", **committed) == 2
        assert 0 < sample(samples, "publish_duration_seconds_sum", **committed) < 120
        assert sample(samples, "leases") == 0

        expire_whitelist(repo)  # nobody renewed it: monitoring must say so
        failing = requests.get(url + "/health")
        assert failing.status_code == 503 and failing.json()["status"] == "failing"
        assert "expired" in failing.json()["problem"]
        after = parse_metrics(requests.get(url + "/metrics").text)
        assert sample(after, "head_ok", **repository) == 0


def test_the_operator_drops_a_dead_publishers_lease_and_the_waiting_publish_lands(
    repo: Repo, tmp_path: Path
) -> None:
    token = make_token(repo, "atlas-ci", "/sw")
    release = tiny_tree(tmp_path / "src")
    with serving_process(repo.dir, tmp_path / "serve.log") as (url, _):
        dead = Api(url, token)
        lease = dead.lease("/sw/atlas/21.0")  # then its publisher was killed

        listed = run_cli("repo-server", "leases", repo.dir, "--json").stdout
        (held,) = json.loads(listed)["leases"]
        assert (held["id"], held["path"], held["token"]) == (lease, "/sw/atlas/21.0", "atlas-ci")
        assert ISO_UTC.match(held["since"]) and ISO_UTC.match(held["expires"])
        assert held["expires"] > held["since"] and held["committing"] is False
        table = run_cli("repo-server", "leases", repo.dir).stdout.decode()
        assert table.split("\t")[:3] == [lease, "/sw/atlas/21.0", "atlas-ci"]
        assert requests.get(f"{url}{API}/operator/leases").status_code == 401

        err = tmp_path / "publish.err"
        with err.open("wb") as stderr:
            waiting = subprocess.Popen(
                [BIN / "cvmbuild", "publish", release, "--repo", url, "--path", "/sw/atlas/21.0"],
                env={**os.environ, "CVMBUILD_TOKEN": token},
                stdout=subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        try:
            until("the publish waits", lambda: b"waiting" in err.read_bytes())

            dropped = run_cli("repo-server", "leases", repo.dir, "--drop", "/sw/atlas/21.0")

            assert f"dropped the lease on /sw/atlas/21.0 of token 'atlas-ci' (id {lease})" in (
                dropped.stdout.decode()
            )
            assert waiting.wait(timeout=60) == 0, err.read_text()
        finally:
            stop(waiting)
        assert repo.open().head().revision == 1
        bag = ObjectBag()
        bag.content(b"late")
        late = dead.upload(lease, bag.objects.items())
        assert late.status_code == 410 and "operator dropped" in late.json()["error"]
        assert run_cli("repo-server", "leases", repo.dir).stdout == b""
        unknown = run_cli("repo-server", "leases", repo.dir, "--drop", "/sw/cms", check=False)
        assert unknown.returncode == 1 and unknown.stderr.decode().startswith("error: no lease")

    stopped = run_cli("repo-server", "leases", repo.dir)
    assert stopped.stdout == b"" and b"no `repo-server serve` runs" in stopped.stderr
    gone = run_cli("repo-server", "leases", repo.dir, "--drop", lease, check=False)
    assert gone.returncode == 1 and gone.stderr.decode().count("\n") == 1
    assert not (repo.keys / "serving.json").exists()
