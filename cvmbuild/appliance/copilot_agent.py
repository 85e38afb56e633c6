"""The Co-Pilot agent: pulls jobs from a Co-Pilot manager (protocol v1, docs/COPILOT.md),
runs each one and reports it. Standard library only, imports nothing from cvmbuild: the
appliance carries this file and copilot_protocol.py beside its guest agent, which calls
`run_agent` with its own mount callback and console.

`run_agent(config, client, mount, say)`:
- asks for a job; while there is none (or no answer) waits 1, 2, 4 ... 60 s with jitter,
  and returns 0 once `idle_exit_s` passed without work (0: never), or raises AgentError
  if the manager stayed unreachable all that time; `Refused` (the token) ends it at once.
- prepares a job first: each repository it names through `mount` (which returns where it
  is mounted), each input fetched within its declared size and SHA-256 checked. A job
  that cannot be prepared is reported failed (EXIT_NOT_RUN, with why), never run.
- runs its command with `/bin/sh -c` in a fresh directory under the work directory, in
  its own process group, with the job's environment plus CVM_JOB_DIR, CVM_PROGRESS_FILE
  (a fraction written there goes with the heartbeats), CVM_CVMFS_ROOT and COPILOT_JOB_ID.
  The lease is renewed every third of its life from the job's start to its report; a
  409 kills the process group and abandons the job.
- uploads the outputs with their hashes (transient failures retried), then reports the
  exit code (128+N for signal N) and the hashes uploaded; an output missing or not
  uploaded is named in the report's message, never dropped silently.
- says `copilot job J start`, `copilot job J exit N`, `copilot job J done|failed`, and
  one line per problem.

Host form: `python3 -m cvmbuild.appliance.copilot_agent --url URL --token-file F
--work DIR [--cvmfs-root /cvmfs] [--idle-exit S] [--name NAME]`; the repositories must
be mounted under --cvmfs-root already. Exit 0 when idle, 1 when the manager stayed
unreachable, 2 when it refused the token or an option is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

try:
    from cvmbuild.appliance.copilot_protocol import (
        AgentError,
        Input,
        Job,
        JobError,
        LeaseLost,
        ManagerClient,
        ManagerError,
        NoWork,
        Offer,
        Refused,
        Unreachable,
        parse_job,
    )
    from cvmbuild.appliance.copilot_protocol import (  # the guest agent's, too
        Repository as Repository,
    )
except ImportError:  # in the appliance: beside the guest agent, which put it on sys.path
    from copilot_protocol import (  # type: ignore[no-redef]
        AgentError,
        Input,
        Job,
        JobError,
        LeaseLost,
        ManagerClient,
        ManagerError,
        NoWork,
        Offer,
        Refused,
        Repository,
        Unreachable,
        parse_job,
    )

MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
TRIES = 5  # an input, the output locations, an upload: 1+2+4+8 s of waiting at most
DONE_TRIES = 8  # the report outlives a manager restart of about two minutes
EXIT_NOT_RUN = 125  # reported for a job that could not be prepared (the message says why)
EXIT_IDLE, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2
USER_DATA_KEYS = frozenset({"url", "token", "idle_exit_s", "name", "summary_file"})
PR_SET_PDEATHSIG = 1
MiB = 1 << 20

Mount = Callable[[Repository], str]
Say = Callable[[str], None]
T = TypeVar("T")


class ConfigError(AgentError):
    """The agent's own settings (options, user data) are unusable."""


# -- the pure core: backoff, progress, configuration ---------------------------------


def backoff_s(attempt: int, rng: random.Random) -> float:
    """The wait before try attempt+1 after `attempt` tries without work: doubling from
    MIN_BACKOFF_S to MAX_BACKOFF_S, each drawn from the upper half of its range so that
    a fleet started at once spreads out."""
    cap = min(MAX_BACKOFF_S, MIN_BACKOFF_S * float(2 ** min(attempt, 16)))
    return max(MIN_BACKOFF_S, cap * rng.uniform(0.5, 1.0))


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_progress(text: str) -> float | None:
    """The job's progress: the last number in its progress file (as vboxwrapper reads
    fraction_done_filename), kept within 0..1; None while there is none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return min(1.0, max(0.0, float(numbers[-1])))


def shell_status(returncode: int) -> int:
    """Popen's -N for a signal becomes 128+N, as a shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class AgentConfig:
    url: str
    token: str
    work_dir: str
    name: str
    idle_exit_s: float = 0.0  # 0: never
    cvmfs_root: str = "/cvmfs"
    summary_file: str = ""  # a plain name: "JOB EXIT STATE" per reported job, in the job dir
    summary_dir: str = ""  # where summary_file goes (the appliance's job directory)


def check_url(url: str, where: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: {url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def config_from_user_data(
    table: Mapping[str, str], source: str, work_dir: str, default_name: str
) -> AgentConfig:
    """The `[copilot]` user-data table (string values): url and token required."""
    unknown = set(table) - USER_DATA_KEYS
    if unknown:
        raise ConfigError(f"{source}: [copilot] unknown key {sorted(unknown)[0]!r}")
    for key in ("url", "token"):
        if not table.get(key, "").strip():
            raise ConfigError(f"{source}: [copilot] {key} is missing")
    try:
        idle = float(table.get("idle_exit_s", "0"))
    except ValueError:
        idle = -1.0
    if not idle >= 0:
        raise ConfigError(f"{source}: [copilot] idle_exit_s must be a number of seconds >= 0")
    summary = table.get("summary_file", "").strip()
    if summary and ("/" in summary or summary in (".", "..")):
        raise ConfigError(f"{source}: [copilot] summary_file must be a plain file name")
    return AgentConfig(
        summary_file=summary,
        url=check_url(table["url"].strip(), f"{source}: [copilot] url"),
        token=table["token"].strip(),
        work_dir=work_dir,
        name=table.get("name", "").strip() or default_name,
        idle_exit_s=idle,
    )


def exit_status(error: AgentError) -> int:
    """The agent's exit status when it stops on this error."""
    return EXIT_REFUSED if isinstance(error, Refused | ConfigError) else EXIT_UNREACHABLE


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# -- the I/O: the loop, one job, the lease -------------------------------------------


def read_progress(path: str) -> float | None:
    try:
        with open(path, errors="replace") as f:
            return parse_progress(f.read(4096))
    except OSError:
        return None


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resources(work_dir: str) -> dict[str, int]:
    """What this host offers a job, for the manager to match (protocol v1 get job)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count() or 1,
        "memory_mb": memory // MiB,
        "disk_mb": shutil.disk_usage(work_dir).free // MiB,
    }


class LeaseKeeper(threading.Thread):
    """Renews a job's lease every third of its life, sending the job's progress; a 409
    sets `lost` (and `wake`) and ends the renewals; other failures are tried again
    within 5 s."""

    def __init__(
        self, client: ManagerClient, job_id: str, lease: str, life_s: float,
        progress_file: str, say: Say, wake: threading.Event,
    ) -> None:  # fmt: skip
        super().__init__(name=f"lease of {job_id}", daemon=True)
        self.client, self.job_id, self.lease = client, job_id, lease
        self.interval = life_s / 3
        self.progress_file = progress_file
        self.say = say
        self.wake = wake
        self.lost = threading.Event()
        self.reason = ""
        self._stopped = threading.Event()

    def run(self) -> None:
        wait = self.interval
        while not self._stopped.wait(wait):
            try:
                progress = read_progress(self.progress_file)
                life = self.client.heartbeat(self.job_id, self.lease, progress)
                self.interval = life / 3 if life else self.interval
                wait = self.interval
            except LeaseLost as exc:
                self.reason = str(exc)
                self.lost.set()
                self.wake.set()
                return
            except AgentError as exc:
                self.say(f"copilot job {self.job_id}: lease not renewed ({exc}); trying again")
                wait = min(self.interval, 5.0)

    def stop(self) -> None:
        self._stopped.set()


class Agent:
    def __init__(
        self, config: AgentConfig, client: ManagerClient, mount: Mount, say: Say,
        progress_file: str | None = None, rng: random.Random | None = None,
    ) -> None:  # fmt: skip
        self.config, self.client, self.mount, self.say = config, client, mount, say
        self.progress_file = progress_file
        self.rng = rng or random.Random()

    def run(self) -> int:
        os.makedirs(self.config.work_dir, exist_ok=True)
        idle_since = time.monotonic()
        attempt = 0
        while True:
            problem = None
            try:
                answer = self.client.get_job(self.config.name, resources(self.config.work_dir))
            except Refused as exc:
                raise Refused(f"the manager refused this agent's token ({exc})") from None
            except (Unreachable, ManagerError) as exc:
                answer, problem = NoWork(), str(exc)
                self.say(f"copilot: {exc}")
            if isinstance(answer, Offer):
                self.serve(answer)
                idle_since, attempt = time.monotonic(), 0
                continue
            idle = time.monotonic() - idle_since
            if self.config.idle_exit_s and idle >= self.config.idle_exit_s:
                if problem is not None:
                    raise AgentError(f"no answer from the manager for {idle:.0f} s: {problem}")
                self.say(f"copilot: no work for {idle:.0f} s, leaving")
                return EXIT_IDLE
            wait = backoff_s(attempt, self.rng)
            attempt += 1
            if answer.retry_after_s is not None:
                wait = max(wait, min(answer.retry_after_s, MAX_BACKOFF_S))
            if self.config.idle_exit_s:
                wait = min(wait, self.config.idle_exit_s - idle)
            time.sleep(wait)

    def serve(self, offer: Offer) -> None:
        """One job, from its lease to its report (or abandon)."""
        job_id, lease = offer.job_id, offer.lease.id
        self.say(f"copilot job {job_id} start")
        job_dir = tempfile.mkdtemp(prefix="job-", dir=self.config.work_dir)
        progress = self.progress_file or os.path.join(job_dir, ".progress")
        if self.progress_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.progress_file)  # the previous job's
        wake = threading.Event()
        keeper = LeaseKeeper(self.client, job_id, lease, offer.lease.expires_in_s, progress,
                             self.say, wake)  # fmt: skip
        keeper.start()
        try:
            try:
                job = parse_job(offer.job)
                self.prepare(job, job_dir)
            except JobError as exc:
                self.say(f"copilot job {job_id} not run: {exc}")
                self.report(job_id, lease, EXIT_NOT_RUN, {}, [f"not run: {exc}"])
                return
            status = self.execute(job, job_dir, progress, keeper, wake)
            if status is None:
                raise LeaseLost(keeper.reason)
            self.say(f"copilot job {job_id} exit {status}")
            uploaded, problems = self.store_outputs(job, job_dir, lease)
            self.report(job_id, lease, status, uploaded, problems)
        except LeaseLost as exc:
            self.say(f"copilot job {job_id} abandoned: the lease is lost ({exc})")
        finally:
            keeper.stop()
            shutil.rmtree(job_dir, ignore_errors=True)

    def prepare(self, job: Job, job_dir: str) -> None:
        for repo in job.repositories:
            root = self.mount(repo)
            for path in repo.paths:
                if not os.path.exists(os.path.join(root, path.lstrip("/"))):
                    raise JobError(f"repository {repo.name} has no {path}")
        for item in job.inputs:
            try:
                self.retrying(
                    f"input {item.name}", functools.partial(self.fetch, item, job_dir), TRIES
                )
            except LeaseLost:
                raise
            except (Unreachable, ManagerError) as exc:
                raise JobError(f"input {item.name}: {exc}") from None

    def fetch(self, item: Input, job_dir: str) -> None:
        with open(os.path.join(job_dir, item.name), "wb") as out:
            self.client.fetch(item.url, out, item)

    def execute(
        self, job: Job, job_dir: str, progress: str, keeper: LeaseKeeper, wake: threading.Event
    ) -> int | None:
        """The command's status, or None when the lease was lost (the job is killed)."""
        if keeper.lost.is_set():
            return None
        env = {**os.environ, **job.environment, "CVM_JOB_DIR": job_dir,
               "CVM_PROGRESS_FILE": progress, "CVM_CVMFS_ROOT": self.config.cvmfs_root,
               "COPILOT_JOB_ID": job.id}  # fmt: skip
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
        proc = subprocess.Popen(
            ["/bin/sh", "-c", job.command], cwd=job_dir, env=env, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_dies_with_parent(prctl, os.getpid()),
        )  # fmt: skip

        # A thread waits for the command so that the main one sleeps until either the
        # command ends or the lease is lost, without polling.
        def waiter() -> None:
            proc.wait()
            wake.set()

        threading.Thread(target=waiter, daemon=True).start()
        try:
            wake.wait()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the abandoned job, or its leftovers
            returncode = proc.wait()
        return None if keeper.lost.is_set() else shell_status(returncode)

    def store_outputs(self, job: Job, job_dir: str, lease: str) -> tuple[dict[str, str], list[str]]:
        """Upload what the job left: (name → SHA-256 of each output uploaded, problems)."""
        hashes, problems = {}, []
        for name in job.outputs:
            path = os.path.join(job_dir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                hashes[name] = file_sha256(path)
            else:
                problems.append(f"output {name} is missing")
        if not hashes:
            return {}, problems
        try:
            where = self.retrying(
                "output location", lambda: self.client.output_locations(job.id, lease), TRIES
            )
        except LeaseLost:
            raise
        except (Unreachable, ManagerError) as exc:
            return {}, [*problems, f"no output location: {exc}"]
        uploaded = {}
        for name, digest in hashes.items():
            url = where.get(name)
            if url is None:
                problems.append(f"output {name}: the manager gave no upload location")
                continue
            path = os.path.join(job_dir, name)
            self.say(f"copilot job {job.id} uploading {name}")
            try:
                self.retrying(f"upload of {name}",
                              functools.partial(self.client.upload, url, lease, path, digest),
                              TRIES)  # fmt: skip
                uploaded[name] = digest
            except LeaseLost:
                raise
            except (Unreachable, ManagerError) as exc:
                problems.append(f"output {name} not uploaded: {exc}")
        return uploaded, problems

    def report(
        self, job_id: str, lease: str, status: int, outputs: Mapping[str, str], problems: list[str]
    ) -> None:
        message = "; ".join(problems)
        try:
            state = self.retrying(
                "report",
                lambda: self.client.done(job_id, lease, status, outputs, message),
                DONE_TRIES,
            )
        except LeaseLost:
            raise
        except (Unreachable, ManagerError) as exc:
            self.say(f"copilot job {job_id} not reported ({exc}); the manager requeues it "
                     "when its lease expires")  # fmt: skip
            return
        self.say(
            f"copilot job {job_id} {state or 'reported'}" + (f": {message}" if message else "")
        )
        if self.config.summary_file:
            # under BOINC the task's own output: which jobs this VM ran (credit, audit)
            path = os.path.join(self.config.summary_dir, self.config.summary_file)
            with open(path, "a", encoding="utf-8") as summary:
                summary.write(f"{job_id} {status} {state or 'reported'}\n")

    def retrying(self, what: str, call: Callable[[], T], tries: int) -> T:
        """call(), tried again after a backoff when there was no usable answer."""
        for attempt in range(tries):
            try:
                return call()
            except Unreachable as exc:
                if attempt + 1 == tries:
                    raise
                wait = backoff_s(attempt, self.rng)
                self.say(f"copilot: {what}: {exc}; trying again in {wait:.0f} s")
                time.sleep(wait)
        raise AssertionError("unreachable")


def run_agent(
    config: AgentConfig, client: ManagerClient, mount: Mount, say: Say,
    progress_file: str | None = None,
) -> int:  # fmt: skip
    return Agent(config, client, mount, say, progress_file).run()


def _dies_with_parent(prctl: Callable[..., int], parent: int) -> Callable[[], None]:
    """A job of an agent killed with SIGKILL must not run on unseen."""

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# -- the host form -----------------------------------------------------------------


def mounted_under(root: str, mount_at: Callable[[Repository, str], None] | None = None) -> Mount:
    """Each repository a job names at ROOT/NAME: mounted there by mount_at(repo, path) the
    first time (the appliance), or mounted beforehand (a host). Either failure is the
    job's, not the agent's."""

    def mount(repo: Repository) -> str:
        path = os.path.join(root, repo.name)
        if os.path.ismount(path):
            return path
        if mount_at is None:
            raise JobError(
                f"repository {repo.name} is not mounted at {path}: mount it there with "
                "cvmfs-client before starting the agent (or give the right --cvmfs-root)"
            )
        try:
            mount_at(repo, path)
        except Exception as exc:  # whatever the mount says, the job reports it
            raise JobError(f"repository {repo.name}: {exc}") from None
        return path

    return mount


def run_in_appliance(
    config: AgentConfig, mount_at: Callable[[Repository, str], None], say: Say,
    progress_file: str,
) -> int:  # fmt: skip
    """The guest agent's entry: the agent's exit status, its error said on the console."""
    client = ManagerClient(config.url, config.token)
    try:
        return run_agent(config, client, mounted_under(config.cvmfs_root, mount_at), say,
                         progress_file)  # fmt: skip
    except AgentError as exc:
        say(f"error: copilot: {exc}")
        return exit_status(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="copilot-agent", description="Pull jobs from a Co-Pilot manager and run them."
    )
    parser.add_argument("--url", required=True, help="the manager, e.g. https://copilot:8080")
    parser.add_argument("--token-file", required=True, help="a file holding an agent token")
    parser.add_argument("--work", required=True, help="the jobs' directories go here")
    parser.add_argument("--cvmfs-root", default="/cvmfs", help="where repositories are mounted")
    parser.add_argument("--idle-exit", type=float, default=0.0,
                        help="leave after this many seconds without work (0: never)")  # fmt: skip
    parser.add_argument("--name", default="", help="this agent's name for the manager")
    args = parser.parse_args(argv)
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            print(message, file=sys.stderr, flush=True)

    try:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file: {exc}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        config = AgentConfig(
            url=check_url(args.url, "--url"), token=token,
            work_dir=os.path.abspath(args.work), name=args.name or default_name(),
            idle_exit_s=max(0.0, args.idle_exit), cvmfs_root=os.path.abspath(args.cvmfs_root),
        )  # fmt: skip
        # SIGTERM unwinds like an exception, so that the running job is killed first.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        client = ManagerClient(config.url, config.token)
        return run_agent(config, client, mounted_under(config.cvmfs_root), say)
    except AgentError as exc:
        say(f"copilot-agent: error: {exc}")
        return exit_status(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
