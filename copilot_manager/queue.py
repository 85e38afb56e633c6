"""The generic job queue in Redis: every transition one Lua script (queue_scripts.py), so
the managers in front of it hold no state.

States: queued -> running (leased) -> done | failed; running -> queued when a lease
expires (failed after max_attempts); queued/running -> cancelled; requeue brings a
running, failed or cancelled job back to the queue with its attempts reset. Expired
leases are reaped by get-job, status and show, never by a timer.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from copilot_manager import queue_scripts as lua
from copilot_manager.jobs import JobSpec, Resources

STATES = ("queued", "running", "done", "failed", "cancelled")
SCAN = 100  # queued jobs looked at for one that fits the agent's resources
EXPIRING_WINDOW_S = 60
AGENTS_FORGOTTEN_AFTER_S = 7 * 86400  # status lists agents seen within a week
SUBMISSION_KEYS_KEPT_S = 7 * 86400  # a submission sent again within a week is recognised
# Redis runs one script at a time: more connections than this only queue inside it.
POOL_CONNECTIONS = 64
POOL_WAIT_S = 30


@dataclass(frozen=True)
class Submitted:
    ids: list[str]
    first_time: bool  # False: the same submission (idempotency key) sent again


@dataclass(frozen=True)
class Leased:
    id: str
    spec: dict[str, Any]
    lease: str
    lease_s: int
    attempts: int


@dataclass(frozen=True)
class Finished:
    state: str  # done | failed
    first_report: bool  # False: the same lease reported again, nothing changed
    stale_uploads: list[tuple[str, str]]  # (lease, name) stored by earlier attempts


@dataclass(frozen=True)
class JobAttempts:
    state: str
    lease: str | None  # the running attempt's
    done_lease: str | None  # the attempt whose report finished the job
    finished: float | None  # seconds since the epoch
    inputs: frozenset[str]  # sha256 of the inputs its spec names


class RedisQueue:
    def __init__(self, client: aioredis.Redis, prefix: str = "copilot:"):
        self.redis = client
        self.prefix = prefix
        self._scripts = {
            name: client.register_script(lua.PRELUDE + getattr(lua, name))
            for name in (
                "SUBMIT", "LEASE", "HEARTBEAT", "CHECK", "RECORD_UPLOAD", "DONE",
                "REQUEUE", "CANCEL", "STATUS", "SHOW", "FORGET",
            )
        }  # fmt: skip

    @classmethod
    def from_url(cls, url: str, prefix: str = "copilot:") -> RedisQueue:
        """redis://HOST:PORT/DB or unix:///PATH; connections are pooled.

        No retries inside redis-py: a script whose connection broke may have run, and
        running it again (a second submit, a second lease) is not the caller's intent.
        The request fails with 503 instead and the client decides (done and heartbeat
        are idempotent for the agent)."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            # a request waits for a free connection rather than failing: redis-py's
            # plain asyncio pool refuses the 101st request in flight with an error
            max_connections=POOL_CONNECTIONS,
            timeout=POOL_WAIT_S,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(aioredis.Redis(connection_pool=pool), prefix)

    async def _run(self, name: str, *args: object) -> Any:
        return await self._scripts[name](keys=[], args=[self.prefix, *args])  # type: ignore[list-item]

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    async def submit(self, specs: list[JobSpec], key: str = "") -> Submitted | None:
        """Queue the jobs. With a key, a submission sent again (its answer was lost) gets
        the first one's ids and queues nothing; None when the key was used for other jobs."""
        args: list[object] = []
        for s in specs:
            r = s.resources
            args += [json.dumps(s.to_json()), s.max_attempts, s.lease_s]
            args += [r.cpus, r.memory_mb, r.disk_mb]
        digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()
        found = await self._run("SUBMIT", key, digest, SUBMISSION_KEYS_KEPT_S, *args)
        if found[0] == "conflict":
            return None
        return Submitted(list(found[1:]), found[0] == "new")

    async def lease(self, agent: str, offered: Resources) -> Leased | None:
        lease = secrets.token_urlsafe(16)
        found = await self._run(
            "LEASE", agent, lease, offered.cpus, offered.memory_mb, offered.disk_mb, SCAN
        )
        if not found:
            return None
        job_id, spec, lease_s, attempts = found
        return Leased(job_id, json.loads(spec), lease, int(lease_s), int(attempts))

    async def heartbeat(self, job_id: str, lease: str, progress: float | None) -> int | None:
        """The lease renewed for another lease_s seconds; None when it is not current."""
        found = await self._run("HEARTBEAT", job_id, lease, "" if progress is None else progress)
        return None if not found else int(found)

    async def current_spec(self, job_id: str, lease: str) -> dict[str, Any] | None:
        found = await self._run("CHECK", job_id, lease)
        return json.loads(found) if found else None

    async def record_upload(self, job_id: str, lease: str, name: str, sha: str, size: int) -> bool:
        return bool(await self._run("RECORD_UPLOAD", job_id, lease, name, sha, size))

    async def done(
        self, job_id: str, lease: str, exit_code: int, outputs: dict[str, str], message: str
    ) -> Finished | None:
        found = await self._run("DONE", job_id, lease, exit_code, json.dumps(outputs), message)
        if not found:
            return None
        stale = [(f.partition("/")[0], f.partition("/")[2]) for f in found[2:]]
        return Finished(found[1], found[0] == "new", stale)

    async def requeue(self, job_id: str) -> str:
        return str(await self._run("REQUEUE", job_id))

    async def cancel(self, job_id: str) -> str:
        return str(await self._run("CANCEL", job_id))

    async def status(self, agents: int = 100) -> dict[str, Any]:
        forget_ms = AGENTS_FORGOTTEN_AFTER_S * 1000
        raw = json.loads(await self._run("STATUS", EXPIRING_WINDOW_S * 1000, agents, forget_ms))
        now = raw["now"]
        counts = dict.fromkeys(STATES, 0)
        pairs = raw["counts"] or []
        for i in range(0, len(pairs), 2):
            counts[pairs[i]] = int(pairs[i + 1])
        pairs = raw["agents"] or []
        seen = [
            {"name": pairs[i], "last_seen_s_ago": round((now - float(pairs[i + 1])) / 1000, 1)}
            for i in range(0, len(pairs), 2)
        ]
        expiring = [
            {"id": e[0], "agent": e[1] or None, "expires_in_s": round(max(e[2], 0) / 1000, 1)}
            for e in raw["expiring"] or []
        ]
        return {"counts": counts, "agents": seen, "expiring": expiring}

    async def job_ids(self) -> AsyncIterator[str]:
        """Every job Redis holds, in no order (SCAN: safe on a live queue)."""
        async for key in self.redis.scan_iter(match=f"{self.prefix}job:*", count=1000):
            job_id = key[len(self.prefix) + 4 :]
            if job_id.isdigit():  # not a job's ":up" hash
                yield job_id

    async def attempts(self, job_ids: list[str]) -> dict[str, JobAttempts | None]:
        """For each job: its state, the lease it runs under and the lease whose outputs
        it kept; None for a job Redis does not hold."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            fields = ("state", "lease", "done_lease", "finished", "spec")
            pipe.hmget(f"{self.prefix}job:{job_id}", *fields)
        found: dict[str, JobAttempts | None] = {}
        for job_id, (state, lease, done_lease, finished, spec) in zip(
            job_ids, await pipe.execute(), strict=True
        ):
            found[job_id] = None if state is None else JobAttempts(
                state, lease, done_lease, None if finished is None else int(finished) / 1000,
                frozenset(i["sha256"] for i in json.loads(spec)["inputs"]),
            )  # fmt: skip
        return found

    async def forget(self, job_id: str, finished_before_s: float) -> str | None:
        """Drop a finished job from Redis if it finished before then; its state, or None."""
        forgotten = await self._run("FORGET", job_id, int(finished_before_s * 1000))
        return str(forgotten) if forgotten else None

    async def show(self, job_id: str) -> dict[str, Any] | None:
        """The job as an operator sees it, or None."""
        pairs, left = await self._run("SHOW", job_id)
        if not pairs:
            return None
        f = dict(zip(pairs[::2], pairs[1::2], strict=True))
        seconds = {k: int(f[k]) / 1000 for k in ("submitted", "started", "finished") if k in f}
        return {
            "id": job_id,
            "state": f["state"],
            "attempts": int(f["attempts"]),
            "max_attempts": int(f["max_attempts"]),
            "agent": f.get("agent"),
            "progress": float(f["progress"]) if f.get("progress") else None,
            "lease_expires_in_s": None if not left else round(int(left) / 1000, 1),
            "exit_code": int(f["exit_code"]) if "exit_code" in f else None,
            "outputs": json.loads(f["outputs"]) if f.get("outputs") not in (None, "{}") else {},
            "output_lease": f.get("done_lease"),
            "message": f.get("message", ""),
            "job": json.loads(f["spec"]),
            **seconds,
        }
