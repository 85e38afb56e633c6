"""Host programs (`<job_desc>` `<task>`s) run in order under the BOINC client's control,
as BOINC's `samples/wrapper` does (7.20), so that plain-wrapper job files keep working.

Every second: `suspended` stops the task's process group (SIGSTOP) and resuming
continues it (SIGCONT); `quit_request` or `no_heartbeat` kills the group and exits
temporarily (the client restarts the job later); `abort_request` kills the group and
finishes with EXIT_ABORTED_BY_CLIENT. Progress is the last number in the task's
`fraction_done_filename`, weighted by the tasks' `weight`s, reported with the tasks'
CPU time. `wrapper_checkpoint.txt` in the slot (BOINC's wrapper's file and format:
"TASKS_DONE CPU_S RUN_S") records finished tasks, so a restarted job resumes at the
next task. A task that exits with code N != 0 ends the job with status N (a task
killed by a signal: EXIT_CHILD_FAILED); a task's `time_limit` stops it and it counts
as done, as in BOINC's wrapper. No process of a task outlives the wrapper: each task
is its own process group, killed whenever the wrapper leaves, and its leader dies
with the wrapper (PR_SET_PDEATHSIG) if the wrapper is killed outright.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

from cvmbuild.boinc.api import (
    EXIT_ABORTED_BY_CLIENT,
    EXIT_CHILD_FAILED,
    EXIT_INIT_FAILURE,
    BoincApi,
    log,
)
from cvmbuild.boinc.jobfile import HostJob, HostTask
from cvmbuild.boinc.tools import dies_with_parent

CHECKPOINT_FILE = "wrapper_checkpoint.txt"
POLL_S = 1.0
KILL_GRACE_S = 3.0  # SIGTERM first, SIGKILL after this
RESTART_DELAY_S = 10  # temporary exit: when the client may start us again

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Checkpoint:
    tasks_done: int = 0
    cpu_time: float = 0.0
    run_time: float = 0.0


def parse_checkpoint(text: str) -> Checkpoint:
    """The wrapper's checkpoint file; anything unreadable means: start from the top,
    as BOINC's wrapper does."""
    parts = text.split()
    try:
        done, cpu, run = int(parts[0]), float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        return Checkpoint()
    return Checkpoint(max(0, done), max(0.0, cpu), max(0.0, run))


def format_checkpoint(checkpoint: Checkpoint) -> str:
    return f"{checkpoint.tasks_done} {checkpoint.cpu_time:f} {checkpoint.run_time:f}\n"


def last_fraction(text: str) -> float | None:
    """The last number in a fraction-done file, clamped to [0, 1]; None if none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return min(1.0, max(0.0, float(numbers[-1])))


def job_fraction(job: HostJob, tasks_done: int, task_fraction: float) -> float:
    """Overall progress: finished tasks' weights plus the running task's share."""
    total = sum(task.weight for task in job.tasks)
    done = sum(task.weight for task in job.tasks[:tasks_done])
    running = job.tasks[tasks_done].weight * task_fraction if tasks_done < len(job.tasks) else 0
    return min(1.0, (done + running) / total)


def _group_cpu_time(pgid: int) -> float:
    """CPU seconds of the live processes in a process group, with the children they
    have reaped (what BOINC's wrapper sums over the process tree)."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / _CLOCK_TICKS


class TaskProcess:
    """One running task: its own process group, stopped, continued and killed whole."""

    def __init__(self, process: subprocess.Popen[bytes]):
        self.process = process
        self.pid = process.pid
        self.stopped = False
        self.cpu_time = 0.0
        self.status: int | None = None  # the wait status once reaped

    @classmethod
    def start(cls, api: BoincApi, task: HostTask) -> TaskProcess:
        """Start the task; OSError when its program or a stdio file cannot be opened."""
        program = api.resolve(task.application)
        if not os.path.isfile(program):
            raise FileNotFoundError(f"no such file {program!r}")
        with contextlib.ExitStack() as files:
            process = subprocess.Popen(
                [program, *shlex.split(task.command_line)],
                stdin=_open(api, files, task.stdin_filename, "rb"),
                stdout=_open(api, files, task.stdout_filename, "ab"),
                stderr=_open(api, files, task.stderr_filename, "ab"),
                env={**os.environ, **dict(task.setenv)},
                process_group=0,
                preexec_fn=dies_with_parent(),
            )
        return cls(process)

    def poll(self) -> int | None:
        """The task's wait status once it has exited, else None. What it left running
        in its group is killed first, while its zombie still holds the group's id."""
        if self.status is None:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return None
            self._signal_group(signal.SIGKILL)
            _, self.status, usage = os.wait4(self.pid, 0)
            self.process.returncode = os.waitstatus_to_exitcode(self.status)  # reaped here
            self.cpu_time = max(self.cpu_time, usage.ru_utime + usage.ru_stime)
        return self.status

    def wait(self, timeout: float) -> None:
        """Until the task exits, at most `timeout` seconds (a short task need not
        cost a whole poll period)."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def sample_cpu_time(self) -> float:
        if self.status is None:
            self.cpu_time = max(self.cpu_time, _group_cpu_time(self.pid))
        return self.cpu_time

    def stop(self) -> None:
        self._signal_group(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGTERM the group (continued, so that it can act on it), SIGKILL what is
        left after KILL_GRACE_S, and reap the leader."""
        self.sample_cpu_time()
        self._signal_group(signal.SIGTERM)
        self._signal_group(signal.SIGCONT)
        self.wait(KILL_GRACE_S)
        self._signal_group(signal.SIGKILL)
        while self.poll() is None:  # SIGKILL takes a moment
            time.sleep(0.01)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is empty already
            os.killpg(self.pid, signum)


def _open(api: BoincApi, files: contextlib.ExitStack, logical: str, mode: str) -> IO[bytes] | None:
    if not logical:
        return None
    return files.enter_context(open(api.resolve(logical), mode))


def exit_status(wait_status: int) -> int:
    """The job's status for a task's wait status: its exit code, or EXIT_CHILD_FAILED
    when a signal ended it (the client would take a raw status for a restartable one)."""
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return EXIT_CHILD_FAILED


def _read_checkpoint(slot: Path) -> Checkpoint:
    try:
        return parse_checkpoint((slot / CHECKPOINT_FILE).read_text())
    except FileNotFoundError:
        return Checkpoint()


def _write_checkpoint(api: BoincApi, slot: Path, checkpoint: Checkpoint) -> None:
    partial = slot / f"{CHECKPOINT_FILE}.part"
    partial.write_text(format_checkpoint(checkpoint))
    os.replace(partial, slot / CHECKPOINT_FILE)
    api.checkpoint_completed()


def _read_fraction(path: str) -> float:
    try:
        with open(path, "rb") as file:
            # the last number is all that counts; the file may grow without bound
            file.seek(max(0, os.fstat(file.fileno()).st_size - 256))
            return last_fraction(file.read().decode(errors="replace")) or 0.0
    except OSError:
        return 0.0


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


def run_host_job(api: BoincApi, job: HostJob, slot: Path | None = None) -> NoReturn:
    """Run the job's tasks from the first unfinished one, then finish (never returns)."""
    slot = slot or Path.cwd()
    checkpoint = _read_checkpoint(slot)
    if checkpoint.tasks_done > len(job.tasks):
        api.finish(
            EXIT_INIT_FAILURE,
            f"{CHECKPOINT_FILE} says {checkpoint.tasks_done} tasks are done, "
            f"but the job has {len(job.tasks)}",
        )
    if checkpoint.tasks_done:
        log(f"resuming after {checkpoint.tasks_done} finished task(s)")
    for index in range(checkpoint.tasks_done, len(job.tasks)):
        checkpoint = _run_task(api, job, index, checkpoint, slot)
    api.finish(0)


def _run_task(
    api: BoincApi, job: HostJob, index: int, checkpoint: Checkpoint, slot: Path
) -> Checkpoint:
    """Run one task to its end under the client's control; the checkpoint after it."""
    task = job.tasks[index]
    name = f"task {index + 1} ({task.application})"
    progress_file = api.resolve(task.fraction_done_filename) if task.fraction_done_filename else ""
    if progress_file:  # a stale number from a run before a restart is not progress
        with contextlib.suppress(FileNotFoundError):
            os.unlink(progress_file)
    checkpoint_file = api.resolve(task.checkpoint_filename) if task.checkpoint_filename else ""
    last_checkpoint = _mtime(checkpoint_file) if checkpoint_file else None
    checkpoint_cpu = checkpoint.cpu_time
    try:
        running = TaskProcess.start(api, task)
    except OSError as exc:
        api.finish(EXIT_INIT_FAILURE, f"cannot start {name}: {exc}")
    log(f"{name} started, pid {running.pid}")
    run_time = 0.0
    while True:
        status = api.status()
        if status.abort_request:
            running.kill()
            api.finish(EXIT_ABORTED_BY_CLIENT, f"{name} killed: the client aborted the job")
        if status.quit_request or status.no_heartbeat:
            running.kill()
            why = "the client asked to quit" if status.quit_request else "the client is gone"
            api.temporary_exit(RESTART_DELAY_S, f"{name} killed: {why}")
        if status.suspended and not running.stopped:
            running.stop()
            log(f"{name} suspended")
        elif not status.suspended and running.stopped:
            running.resume()
            log(f"{name} resumed")
        if running.poll() is not None:
            break
        if task.time_limit and run_time >= task.time_limit:
            log(f"{name} reached its time limit of {task.time_limit:g} s")
            running.kill()
            running.status = 0  # BOINC's wrapper counts it as done
            break
        cpu = checkpoint.cpu_time + running.sample_cpu_time()
        mtime = _mtime(checkpoint_file) if checkpoint_file else None
        if mtime != last_checkpoint:
            last_checkpoint, checkpoint_cpu = mtime, cpu
            _write_checkpoint(api, slot, Checkpoint(index, cpu, checkpoint.run_time + run_time))
        fraction = _read_fraction(progress_file) if progress_file else 0.0
        api.report_status(cpu, checkpoint_cpu, job_fraction(job, index, fraction))
        started = time.monotonic()
        running.wait(POLL_S)
        if not running.stopped:
            run_time += time.monotonic() - started
    assert running.status is not None
    code = exit_status(running.status)
    cpu = checkpoint.cpu_time + running.cpu_time
    log(f"{name} exited with status {code}, CPU time {running.cpu_time:.2f} s")
    if code != 0:
        api.finish(code, f"{name} failed with exit status {code}")
    after = Checkpoint(index + 1, cpu, checkpoint.run_time + run_time)
    _write_checkpoint(api, slot, after)
    api.report_status(cpu, cpu, job_fraction(job, index + 1, 0.0))
    return after
