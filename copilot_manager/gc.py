"""`copilot-manager gc`: delete from the output store what no job can use any more, and,
when asked, forget jobs that finished long ago.

Deleted without being asked for each: an upload of an attempt that is neither the job's
running attempt nor the one whose report finished it (attempts whose lease expired, a
cancelled job's, a requeued job's earlier ones), and an input that no job in Redis names,
once it is older than a grace period (a submitter uploads inputs before submitting the
job that names them). Kept and counted: files of jobs this Redis does not hold (another
manager's prefix, or a Redis that lost its data: deleting them would be a guess).

Safe on a live queue: the store is listed before Redis is read, and a lease that is not
current when Redis is read can never become current again (each attempt gets a new one).
"""

from __future__ import annotations

import time
from asyncio import to_thread
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from copilot_manager.outputs import OutputStore, Stored

if TYPE_CHECKING:  # the command line imports this module for its defaults: keep it light
    from copilot_manager.queue import RedisQueue

INPUT_GRACE_S = 24 * 3600
BATCH = 500  # jobs read from Redis per round trip


@dataclass
class Collected:
    """What one gc run found, and deleted unless it was a dry run."""

    dry_run: bool
    stale_uploads: int = 0
    unused_inputs: int = 0
    forgotten_jobs: int = 0
    freed_bytes: int = 0
    unknown_job_files: int = 0  # kept
    unknown_jobs: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "stale_uploads": self.stale_uploads,
            "unused_inputs": self.unused_inputs,
            "forgotten_jobs": self.forgotten_jobs,
            "freed_bytes": self.freed_bytes,
            "unknown_job_files": self.unknown_job_files,
            "unknown_jobs": sorted(self.unknown_jobs, key=int),
        }


def upload_owner(key: str) -> tuple[str, str] | None:
    """(job id, lease) of a key jobs/ID/LEASE/NAME; None for anything else."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "jobs" or not parts[1].isdigit():
        return None
    return parts[1], parts[2]


async def collect(
    queue: RedisQueue,
    store: OutputStore,
    *,
    dry_run: bool,
    forget_finished_before: float | None = None,
    input_grace_s: float = INPUT_GRACE_S,
) -> Collected:
    found = Collected(dry_run)
    started = time.time()

    async def delete(item: Stored) -> None:
        found.freed_bytes += item.size
        if not dry_run:
            await to_thread(store.delete, item.key)

    # Listed first: anything stored later belongs to an attempt Redis will show as current.
    uploads = await to_thread(lambda: list(store.listing("jobs/")))
    inputs = await to_thread(lambda: list(store.listing("inputs/")))
    by_job: dict[str, list[tuple[str, Stored]]] = defaultdict(list)
    for item in uploads:
        owner = upload_owner(item.key)
        if owner is not None:
            by_job[owner[0]].append((owner[1], item))

    job_ids = [job_id async for job_id in queue.job_ids()]
    named_inputs: set[str] = set()
    for start in range(0, len(job_ids), BATCH):
        batch = job_ids[start : start + BATCH]
        for job_id, job in (await queue.attempts(batch)).items():
            if job is None:
                continue
            finished_long_ago = (
                forget_finished_before is not None
                and job.finished is not None
                and job.state in ("done", "failed", "cancelled")
                and job.finished < forget_finished_before
            )
            if finished_long_ago:
                # Outputs first: a crash in between leaves a job without outputs that
                # the next run forgets, never outputs no job names.
                for _, item in by_job.pop(job_id, []):
                    await delete(item)
                if dry_run or await queue.forget(job_id, forget_finished_before or 0):
                    found.forgotten_jobs += 1
                continue
            named_inputs |= job.inputs
            kept = {job.lease, job.done_lease}
            for lease, item in by_job.pop(job_id, []):
                if lease not in kept:
                    found.stale_uploads += 1
                    await delete(item)
    for job_id, items in by_job.items():
        found.unknown_jobs.add(job_id)
        found.unknown_job_files += len(items)

    for item in inputs:
        sha = item.key.rpartition("/")[2]
        if sha not in named_inputs and item.modified < started - input_grace_s:
            found.unused_inputs += 1
            await delete(item)
    return found


def describe(found: Collected, store: str) -> str:
    verb = "would free" if found.dry_run else "freed"
    lines = [
        f"{verb} {found.freed_bytes} bytes in {store}: {found.stale_uploads} uploads of "
        f"attempts no job kept, {found.unused_inputs} inputs no job names, and the "
        f"outputs of {found.forgotten_jobs} finished jobs "
        f"{'it would forget' if found.dry_run else 'forgotten'}"
    ]
    if found.unknown_job_files:
        some = ", ".join(sorted(found.unknown_jobs, key=int)[:5])
        lines.append(
            f"kept {found.unknown_job_files} files of {len(found.unknown_jobs)} jobs this "
            f"Redis does not hold (e.g. {some}): check --redis and --prefix"
        )
    return "\n".join(lines)
