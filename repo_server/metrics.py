"""What `repo-server serve` reports to Prometheus (GET /metrics, text exposition format
0.0.4) and to health checks (GET /health): the served revision and its expiries,
requests by method and status, bytes sent, publish durations as a histogram, leases.

Counting is thread-safe (commits run on worker threads); rendering is a pure function
of the counts and the head's state.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Publish durations, lease to commit, in seconds: a patch release to a full release.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


@dataclass(frozen=True)
class HeadState:
    """The served head as /health and /metrics report it."""

    name: str
    revision: int
    published: int
    manifest_expires: int
    whitelist_expires: int
    verified: bool  # the signatures were checked (the master public key is at hand)
    problem: str | None  # why clients refuse it now, or None


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._sent = 0
        self._publishes: dict[str, _Histogram] = {}

    def request(self, method: str, status: int, sent: int) -> None:
        with self._lock:
            self._requests[(method if method in METHODS else "other", status)] += 1
            self._sent += sent

    def publish(self, seconds: float, outcome: str) -> None:
        """A publish over the API ended: committed, or failed (lease to commit)."""
        with self._lock:
            self._publishes.setdefault(outcome, _Histogram()).observe(seconds)

    def render(self, head: HeadState | None, leases: int) -> str:
        with self._lock:
            requests = sorted(self._requests.items())
            sent = self._sent
            publishes = {k: (list(h.counts), h.sum) for k, h in sorted(self._publishes.items())}
        out = _Text()
        if head is not None:
            repo = {"repository": head.name}
            out.metric("revision", "gauge", "The revision the served manifest names.")
            out.sample("revision", repo, head.revision)
            out.metric("published_timestamp_seconds", "gauge", "When it was published.")
            out.sample("published_timestamp_seconds", repo, head.published)
            for what in ("manifest", "whitelist"):
                name = f"{what}_expiry_timestamp_seconds"
                out.metric(name, "gauge", f"When the served {what} expires (Unix time).")
                out.sample(name, repo, getattr(head, f"{what}_expires"))
            out.metric("head_ok", "gauge", "1 if clients accept the served head, else 0.")
            out.sample("head_ok", repo, int(head.problem is None))
        out.metric("http_requests_total", "counter", "HTTP requests answered.")
        for (method, status), count in requests:
            out.sample("http_requests_total", {"method": method, "status": str(status)}, count)
        out.metric("http_response_bytes_total", "counter", "Response body bytes sent.")
        out.sample("http_response_bytes_total", {}, sent)
        name = "publish_duration_seconds"
        out.metric(name, "histogram", "Publishes over the API, from lease to commit.")
        for outcome, (counts, total) in publishes.items():
            cumulative = 0
            for bound, count in zip([*map(_number, BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                out.sample(f"{name}_bucket", {"outcome": outcome, "le": bound}, cumulative)
            out.sample(f"{name}_sum", {"outcome": outcome}, total)
            out.sample(f"{name}_count", {"outcome": outcome}, cumulative)
        out.metric("leases", "gauge", "Publish leases held now.")
        out.sample("leases", {}, leases)
        out.metric("start_time_seconds", "gauge", "When this server started (Unix time).")
        out.sample("start_time_seconds", {}, self.started)
        return out.text()


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


class _Text:
    """Lines of the text exposition format, every name prefixed repo_server_."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [
            f"# HELP repo_server_{name} {help_text}",
            f"# TYPE repo_server_{name} {kind}",
        ]

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        pairs = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        shown = repr(value) if isinstance(value, float) else str(value)
        self.lines.append(
            f"repo_server_{name}{{{pairs}}} {shown}" if pairs else f"repo_server_{name} {shown}"
        )

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
