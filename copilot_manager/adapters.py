"""Where the manager's jobs come from: the adapter interface, and the generic adapter
on the Redis queue (Co-Pilot's "standalone" use).

The HTTP service (service.py) speaks protocol v1 to agents and calls an adapter for the
three things that depend on the experiment's job system: a job for these resources,
where its outputs go, and the job's end. Leases, heartbeats and upload checks are the
manager's own and need no adapter. An HTCondor or PanDA adapter would implement the same
three calls against its system (docs/COPILOT.md, "Adapters"); none is built, since
neither system's daemons can run here to test one against.
"""

from __future__ import annotations

from typing import Protocol

from copilot_manager.jobs import Resources
from copilot_manager.queue import Finished, Leased, RedisQueue


class Adapter(Protocol):
    async def get_job(self, agent: str, resources: Resources) -> Leased | None:
        """A job that fits resources, leased to agent; None when there is no work."""

    async def output_location(self, job_id: str, lease: str) -> list[str] | None:
        """The output names the agent should upload (to the manager, which stores them
        in its output store), or None when lease is no longer the job's."""

    async def job_done(
        self, job_id: str, lease: str, exit_code: int, outputs: dict[str, str], message: str
    ) -> Finished | None:
        """Record the job's end once; None when lease is no longer the job's."""


class GenericRedisAdapter:
    """Jobs submitted to the manager itself (`copilot-manager submit`), queued in Redis."""

    def __init__(self, queue: RedisQueue):
        self.queue = queue

    async def get_job(self, agent: str, resources: Resources) -> Leased | None:
        return await self.queue.lease(agent, resources)

    async def output_location(self, job_id: str, lease: str) -> list[str] | None:
        spec = await self.queue.current_spec(job_id, lease)
        return None if spec is None else list(spec["outputs"])

    async def job_done(
        self, job_id: str, lease: str, exit_code: int, outputs: dict[str, str], message: str
    ) -> Finished | None:
        return await self.queue.done(job_id, lease, exit_code, outputs, message)
