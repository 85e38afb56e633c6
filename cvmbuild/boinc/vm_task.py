"""The VM wrapper's control loop: boot the appliance for one BOINC task and act, once a
second, on what the client asks (suspend, resume, quit, abort) and on what the guest
reports on its console (heartbeats, progress, the job's exit).

`decide` is the pure core (status and observations in, one action out); `run_vm` is
the I/O around it. Job-file tags are explained in docs/BOINC.md.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cvmbuild.boinc import console
from cvmbuild.boinc.api import (
    EXIT_ABORTED_BY_CLIENT,
    EXIT_CHILD_FAILED,
    EXIT_INIT_FAILURE,
    BoincApi,
    BoincStatus,
    log,
    read_init_data,
)
from cvmbuild.boinc.jobfile import VmJob
from cvmbuild.boinc.vm import Vm, VmError

TICK_S = 1.0
POWEROFF_GRACE_S = 120.0  # after `job exit`, how long the guest may take to power off
RESTART_DELAY_S = 10  # after a quit, the client restarts us when it decides; this is a floor
PROGRESS_FILE = "vm_task.json"  # elapsed seconds and progress, kept across restarts


class Act(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    SAVE_AND_EXIT = "save and exit"  # quit request or the client's heartbeat lost
    CHECKPOINT = "checkpoint"
    JOB_DONE = "job done"
    VM_GONE = "vm gone"  # QEMU exited before the job reported its exit
    SILENT = "silent"  # the guest stopped writing to its console
    LEASE_OVER = "lease over"  # job_duration reached


@dataclass
class Seen:
    """What the loop has observed of the VM so far (monotonic seconds)."""

    last_line: float
    last_checkpoint: float
    elapsed_before: float = 0.0  # running seconds of earlier runs of this task
    running_since: float = 0.0
    paused: bool = False
    progress: float | None = None
    job_exit: int | None = None
    job_exit_at: float = 0.0
    guest_error: str | None = None
    log: list[str] = field(default_factory=list)

    def elapsed(self, now: float) -> float:
        return self.elapsed_before + (0.0 if self.paused else now - self.running_since)

    def observe(self, event: console.Event, now: float) -> None:
        self.last_line = now
        if isinstance(event, console.Progress):
            self.progress = event.fraction
        elif isinstance(event, console.JobExit):
            self.job_exit = event.status
            self.job_exit_at = now
        elif isinstance(event, console.Error):
            self.guest_error = event.text


def decide(
    job: VmJob,
    status: BoincStatus,
    seen: Seen,
    now: float,
    vm_exited: bool,
    checkpoint_due: bool,
) -> Act | None:
    """The one action this tick calls for, the most urgent first."""
    if status.abort_request:
        return Act.ABORT
    if status.quit_request or status.no_heartbeat:
        return Act.SAVE_AND_EXIT
    if status.suspended:
        return None if seen.paused else Act.PAUSE
    if seen.paused:
        return Act.RESUME
    if seen.job_exit is not None:
        if vm_exited or now - seen.job_exit_at > POWEROFF_GRACE_S:
            return Act.JOB_DONE
        return None
    if vm_exited:
        return Act.VM_GONE
    if now - seen.last_line > job.minimum_heartbeat_interval:
        return Act.SILENT
    if job.job_duration > 0 and seen.elapsed(now) >= job.job_duration:
        return Act.LEASE_OVER
    if (
        checkpoint_due
        and job.enable_vm_savestate_usage
        and now - seen.last_checkpoint >= job.minimum_checkpoint_interval
    ):
        return Act.CHECKPOINT
    return None


def fraction_done(job: VmJob, seen: Seen, now: float) -> float:
    """The guest's own progress, else elapsed over job_duration, else unknown (0)."""
    if seen.progress is not None:
        return min(1.0, max(0.0, seen.progress))
    if job.job_duration > 0:
        return min(1.0, seen.elapsed(now) / job.job_duration)
    return 0.0


def exit_status(job_exit: int) -> int:
    """BOINC's exit status for the job's: 0 stays 0, a shell status 1-255 is kept (the
    result carries it), anything else is EXIT_CHILD_FAILED."""
    return job_exit if 0 <= job_exit <= 255 else EXIT_CHILD_FAILED


def user_data(job: VmJob, override_text: str | None) -> str:
    """The TOML user data for the config drive. Later layers win: the job file's inline
    `user_data`, its `command_line` and `copilot_url` (the app version's defaults),
    then the tables of the work unit's `user_data_file` (this job's own). Values stay
    strings, as the appliance accepts them."""
    tables: dict[str, dict[str, str]] = {}

    def layer(source: str, text: str | None) -> None:
        if not text:
            return
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{source}: not valid TOML: {exc}") from exc
        for name, values in data.items():
            if not isinstance(values, dict):
                raise ValueError(f"{source}: {name} must be a table")
            tables.setdefault(name, {}).update({k: str(v) for k, v in values.items()})

    layer("user_data", job.user_data)
    if job.command_line:
        tables.setdefault("job", {})["command"] = job.command_line
    if job.copilot_url:
        tables.setdefault("copilot", {})["url"] = job.copilot_url
    layer("user_data_file", override_text)
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


# -- the I/O around it ---------------------------------------------------------------


def _cpu_seconds(pid: int | None) -> float:
    """QEMU's user + system CPU time (what the task costs the volunteer)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load_progress(slot: Path) -> tuple[float, float | None, float]:
    try:
        data = json.loads((slot / PROGRESS_FILE).read_text())
        return float(data["elapsed"]), data.get("progress"), float(data.get("cpu", 0.0))
    except (OSError, ValueError, KeyError):
        return 0.0, None, 0.0


def _save_progress(slot: Path, seen: Seen, now: float, cpu: float) -> None:
    data = {"elapsed": seen.elapsed(now), "progress": seen.progress, "cpu": cpu}
    tmp = slot / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, slot / PROGRESS_FILE)


def run_vm(api: BoincApi, job: VmJob) -> NoReturn:
    slot = Path.cwd()
    init = read_init_data(slot / "init_data.xml")
    cpus = max(1, min(job.cpus, int(init.ncpus) if init.ncpus >= 1 else 1))
    base = Path(api.resolve(job.image)).resolve()
    if not base.is_file():
        api.finish(EXIT_INIT_FAILURE, f"the VM image {job.image} ({base}) is missing")
    vm = Vm(slot, base, job.memory_size_mb, cpus, job.enable_network, job.output_disk_mb)
    try:
        override = None
        if job.user_data_file:  # a work unit's own, when it has one
            with contextlib.suppress(FileNotFoundError):
                override = Path(api.resolve(job.user_data_file)).read_text()
        inputs = {name: Path(api.resolve(name)) for name in job.copy_to_guest}
        vm.prepare(user_data(job, override), inputs)
        restoring = vm.has_checkpoint
        start_vm(vm, restoring)
    except (OSError, ValueError, VmError) as exc:
        vm.kill()
        api.finish(EXIT_INIT_FAILURE, f"cannot start the VM: {exc}")
    now = time.monotonic()
    elapsed, progress, cpu_before = _load_progress(slot)
    seen = Seen(last_line=now, last_checkpoint=now, elapsed_before=elapsed, running_since=now)
    seen.progress = progress
    checkpoint_cpu = cpu_before
    log("vm_task: restored the VM from its checkpoint" if restoring else "vm_task: booting the VM")
    while True:
        now = time.monotonic()
        for line in vm.new_console_lines():
            event = console.parse(line)
            if event is not None:
                seen.observe(event, now)
            elif line.strip():
                seen.last_line = now  # kernel and job output show the guest alive too
        cpu = cpu_before + _cpu_seconds(vm.pid)
        status = api.status()
        action = decide(job, status, seen, now, vm.exited() is not None, api.time_to_checkpoint())
        if action is not None:
            log(f"vm_task: {action.value}")
        if action is Act.ABORT:
            vm.kill()
            api.finish(EXIT_ABORTED_BY_CLIENT, "aborted by the client")
        elif action is Act.SAVE_AND_EXIT:
            _save_and_exit(api, job, vm, seen, now, cpu, slot)
        elif action is Act.PAUSE:
            vm.pause()
            seen.elapsed_before, seen.paused = seen.elapsed(now), True
        elif action is Act.RESUME:
            vm.resume()
            seen.paused, seen.running_since, seen.last_line = False, now, now
        elif action is Act.CHECKPOINT:
            seconds = vm.checkpoint()
            _save_progress(slot, seen, now, cpu)
            api.checkpoint_completed()
            checkpoint_cpu = cpu
            seen.last_checkpoint = time.monotonic()
            log(f"vm_task: checkpoint saved in {seconds:.1f} s")
        elif action in (Act.JOB_DONE, Act.LEASE_OVER):
            _finish(api, job, vm, seen, slot, lease_over=action is Act.LEASE_OVER)
        elif action is Act.VM_GONE:
            why = seen.guest_error or f"QEMU exited {vm.exited()} before the job reported its exit"
            api.finish(EXIT_CHILD_FAILED, f"the appliance failed: {why}")
        elif action is Act.SILENT:
            vm.kill()
            api.finish(
                EXIT_CHILD_FAILED,
                f"the appliance wrote nothing for {job.minimum_heartbeat_interval:.0f} s "
                "(minimum_heartbeat_interval)",
            )
        api.report_status(cpu, checkpoint_cpu, fraction_done(job, seen, now))
        time.sleep(TICK_S)


def start_vm(vm: Vm, restoring: bool) -> None:
    """Start the VM; a saved state that does not restore (QEMU upgraded in between, a
    damaged overlay) costs the work since the checkpoint, not the task: boot cold."""
    try:
        vm.start()
    except VmError as exc:
        if not restoring:
            raise
        log(f"vm_task: the saved VM did not restore ({exc}); booting it afresh")
        vm.kill()
        vm.forget_checkpoint()
        vm.start()


def _save_and_exit(
    api: BoincApi, job: VmJob, vm: Vm, seen: Seen, now: float, cpu: float, slot: Path
) -> NoReturn:
    """Quit (the client's suspend with default preferences, or its shutdown): keep the
    VM's state so the next start resumes it, when the job file allows it."""
    if job.enable_vm_savestate_usage and seen.job_exit is None:
        try:
            seconds = vm.save_and_quit()
            _save_progress(slot, seen, now, cpu)
            api.checkpoint_completed()
            api.temporary_exit(RESTART_DELAY_S, f"VM state saved in {seconds:.1f} s")
        except VmError as exc:
            log(f"vm_task: saving the VM failed ({exc}); it restarts from the beginning")
    vm.kill()
    api.temporary_exit(RESTART_DELAY_S, "VM stopped; it restarts from its last checkpoint")


def _finish(
    api: BoincApi, job: VmJob, vm: Vm, seen: Seen, slot: Path, lease_over: bool
) -> NoReturn:
    vm.kill()
    wanted = {name: Path(api.resolve(name)) for name in job.copy_from_guest}
    try:
        missing = vm.copy_outputs(wanted)
    except VmError as exc:
        api.finish(EXIT_CHILD_FAILED, f"cannot read the output disk: {exc}")
    if lease_over:
        api.finish(0, f"job_duration of {job.job_duration:.0f} s reached")
    assert seen.job_exit is not None
    if seen.job_exit == 0 and missing:
        api.finish(EXIT_CHILD_FAILED, f"the job left no {', '.join(missing)} in its directory")
    if seen.job_exit != 0:
        api.finish(exit_status(seen.job_exit), f"the job exited {seen.job_exit}")
    (slot / PROGRESS_FILE).unlink(missing_ok=True)
    api.finish(0)
