"""A real BOINC client (Debian's boinc-client 7.20) running one job of a hand-made
project in a temporary directory, for the wrapper's tests.

No project server: `client_state.xml` is written by hand (as BOINC's own
samples/client_state_save.xml) with an account file, the app version's files already
in `projects/<escaped url>/` (`<file_info>` status 1), and one result ready to run.
`unsigned_apps_ok` lets it run unsigned files and turns off all network traffic, so
an output file marked `<copy_file/>` lands in the project directory. The client is
driven through `boinccmd` on its own GUI RPC port with its own password, and is
stopped by PID at teardown; any process left with its working directory under the
client's directory fails the test (and is killed).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from xml.sax.saxutils import escape

from tests.conftest import free_port

PROJECT_URL = "http://cvm-test.invalid/"
PROJECT_DIR = "cvm-test.invalid"  # BOINC's escape_project_url of PROJECT_URL
APP = "cvm_wrapper_test"
PLATFORM = "x86_64-pc-linux-gnu"
RESULT = "wu1_0"
PASSWORD = "cvm-test-password"

T = TypeVar("T")


@dataclass(frozen=True)
class AppFile:
    """A file of the app version: physical name, content (or a file to copy, e.g. an
    image), logical name in the slot."""

    name: str
    data: bytes | Path
    open_name: str = ""
    executable: bool = False
    main_program: bool = False


@dataclass(frozen=True)
class Prefs:
    leave_apps_in_memory: bool = False


def _file_info(name: str, executable: bool = False, present: bool = True) -> str:
    return (
        f"<file_info><name>{escape(name)}</name>"
        + ("<executable/>" if executable else "")
        + (
            "<status>1</status>"
            if present
            # An upload URL (it must contain file_upload_handler to count as one) keeps
            # the output in the project directory: the client never uploads here.
            else f"<max_nbytes>10000000</max_nbytes><upload_when_present/>"
            f"<url>{PROJECT_URL}file_upload_handler</url>"
        )
        + "</file_info>\n"
    )


def _file_ref(name: str, open_name: str = "", main: bool = False, copy: bool = False) -> str:
    return (
        f"<file_ref><file_name>{escape(name)}</file_name>"
        + (f"<open_name>{escape(open_name)}</open_name>" if open_name else "")
        + ("<main_program/>" if main else "")
        + ("<copy_file/>" if copy else "")
        + "</file_ref>\n"
    )


def write_project(root: Path, files: list[AppFile], outputs: list[str], prefs: Prefs) -> None:
    """The client's directory: configuration, the project's files and the state."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "gui_rpc_auth.cfg").write_text(PASSWORD + "\n")
    (root / "cc_config.xml").write_text(
        "<cc_config><log_flags><task_debug>1</task_debug></log_flags><options>"
        "<unsigned_apps_ok>1</unsigned_apps_ok><skip_cpu_benchmarks>1</skip_cpu_benchmarks>"
        "<no_gpus>1</no_gpus><no_info_fetch>1</no_info_fetch>"
        "</options></cc_config>\n"
    )
    (root / "global_prefs_override.xml").write_text(
        "<global_preferences>"
        "<run_on_batteries>1</run_on_batteries><run_if_user_active>1</run_if_user_active>"
        "<run_gpu_if_user_active>1</run_gpu_if_user_active><idle_time_to_run>0</idle_time_to_run>"
        "<suspend_cpu_usage>0</suspend_cpu_usage><cpu_usage_limit>100</cpu_usage_limit>"
        "<max_ncpus_pct>100</max_ncpus_pct>"
        f"<leave_apps_in_memory>{int(prefs.leave_apps_in_memory)}</leave_apps_in_memory>"
        "</global_preferences>\n"
    )
    (root / f"account_{PROJECT_DIR}.xml").write_text(
        f"<account><master_url>{PROJECT_URL}</master_url>"
        "<authenticator>cvm-test</authenticator></account>\n"
    )
    project = root / "projects" / PROJECT_DIR
    project.mkdir(parents=True)
    for file in files:
        if isinstance(file.data, Path):
            shutil.copyfile(file.data, project / file.name)
        else:
            (project / file.name).write_bytes(file.data)
        (project / file.name).chmod(0o755 if file.executable else 0o644)
    output_names = [f"{RESULT}_{index}" for index in range(len(outputs))]
    state = (
        "<client_state>\n"
        f"<project><master_url>{PROJECT_URL}</master_url>"
        "<project_name>cvm wrapper test</project_name></project>\n"
        f"<app><name>{APP}</name><user_friendly_name>{APP}</user_friendly_name></app>\n"
        + "".join(_file_info(file.name, file.executable) for file in files)
        + "".join(_file_info(name, present=False) for name in output_names)
        + f"<app_version><app_name>{APP}</app_name><version_num>100</version_num>"
        f"<platform>{PLATFORM}</platform><avg_ncpus>1</avg_ncpus>"
        "<api_version>7.20.0</api_version>\n"
        + "".join(_file_ref(file.name, file.open_name, file.main_program) for file in files)
        + "</app_version>\n"
        f"<workunit><name>wu1</name><app_name>{APP}</app_name><version_num>100</version_num>"
        "<rsc_fpops_est>1e9</rsc_fpops_est><rsc_fpops_bound>1e15</rsc_fpops_bound>"
        "<rsc_memory_bound>1e7</rsc_memory_bound><rsc_disk_bound>1e8</rsc_disk_bound>"
        "</workunit>\n"
        f"<result><name>{RESULT}</name><wu_name>wu1</wu_name><state>2</state>"
        f"<report_deadline>{time.time() + 864000:.0f}</report_deadline>"
        f"<platform>{PLATFORM}</platform><version_num>100</version_num>\n"
        + "".join(
            _file_ref(name, open_name, copy=True)
            for name, open_name in zip(output_names, outputs, strict=True)
        )
        + "</result>\n</client_state>\n"
    )
    (root / "client_state.xml").write_text(state)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_test(parent: int) -> None:
    # A test process killed outright must not leave a client behind.
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def wait_until(check: Callable[[], T | None], timeout: float, what: str | Callable[[], str]) -> T:
    """Poll `check` until it returns something other than None/False; `what` (or what
    it returns, at the timeout: e.g. the client's log) explains a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            reason = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {timeout:g} s waiting for {reason}")
        time.sleep(0.25)


def processes_under(root: Path) -> dict[int, str]:
    """PID -> command line of every process whose working directory is under root."""
    found = {}
    prefix = str(root.resolve())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + "/"):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def process_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, T, Z...), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[1].split()[0].decode()


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


@dataclass
class BoincClient:
    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.root / "client.log"

    @property
    def project_dir(self) -> Path:
        return self.root / "projects" / PROJECT_DIR

    @property
    def slot(self) -> Path:
        return self.root / "slots" / "0"

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "boinc",
                    "--dir",
                    str(self.root),
                    "--allow_multiple_clients",
                    "--gui_rpc_port",
                    str(self.port),
                    "--no_gpus",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=functools.partial(_die_with_test, os.getpid()),
            )
        wait_until(
            lambda: self.rpc("--get_cc_status", check=False).returncode == 0,
            30,
            lambda: f"the BOINC client's GUI RPC on port {self.port}\n{self.log()}",
        )

    def rpc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["boinccmd", "--host", f"localhost:{self.port}", "--passwd", PASSWORD, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"boinccmd {' '.join(args)}: {result.stdout}{result.stderr}")
        return result

    def task(self) -> dict[str, str]:
        """Our result as `boinccmd --get_tasks` shows it ({} once it is gone)."""
        output = self.rpc("--get_tasks").stdout
        for block in re.split(r"\n\d+\) -+\n", output)[1:]:
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in block.splitlines())
            )
            if fields.get("name") == RESULT:
                return fields
        return {}

    def task_op(self, op: str) -> None:
        self.rpc("--task", PROJECT_URL, RESULT, op)

    def finished(self) -> dict[str, str] | None:
        """The task once it has ended for good (boinccmd then shows its exit_status)."""
        task = self.task()
        return task if "exit_status" in task else None

    def wait_finished(self, timeout: float) -> dict[str, str]:
        return wait_until(self.finished, timeout, lambda: f"the task to end\n{self.log()}")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def kill(self) -> None:
        """kill -9 the client (the crash a volunteer's machine can have)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Quit the client politely, then by PID; returns once it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(subprocess.SubprocessError, AssertionError):
            self.rpc("--quit", check=False)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def stored_result(self) -> ET.Element:
        """Our result as the client wrote it to client_state.xml (stop it first)."""
        state = ET.parse(self.root / "client_state.xml").getroot()
        for result in state.iter("result"):
            if result.findtext("name") == RESULT:
                return result
        raise AssertionError(f"{RESULT} is not in client_state.xml")


@contextlib.contextmanager
def boinc_client(
    root: Path, files: list[AppFile], outputs: list[str], prefs: Prefs = Prefs()
) -> Iterator[BoincClient]:
    """A running client with the job installed; stopped at the end, and no process
    left under its directory (leftovers are killed by PID and fail the test)."""
    write_project(root, files, outputs, prefs)
    client = BoincClient(root, free_port())
    try:
        client.start()
        yield client
    finally:
        client.stop()
        leftovers = processes_under(root)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind by the client: {leftovers}"
