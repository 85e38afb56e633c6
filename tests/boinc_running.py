"""The real BOINC client (7.20.5, Debian's boinc-client) attached to the scheduler
emulator: its own data directory, --allow_multiple_clients, a free GUI RPC port, no
CPU benchmarks, no GPUs, no project list fetch, preferences that never suspend for
other load, and --exit_when_idle; stopped by PID at the end, whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.boinc_project import PLATFORM, attach_anonymous
from tests.conftest import free_port

CC_CONFIG = """\
<cc_config>
  <log_flags>
    <task>1</task>
    <file_xfer>1</file_xfer>
    <sched_ops>1</sched_ops>
  </log_flags>
  <options>
    <no_info_fetch>1</no_info_fetch>
    <skip_cpu_benchmarks>1</skip_cpu_benchmarks>
    <no_gpus>1</no_gpus>
    <exit_when_idle>1</exit_when_idle>
    <allow_multiple_clients>1</allow_multiple_clients>
  </options>
</cc_config>
"""

# suspend_cpu_usage 0: the default suspends work when other load exceeds 25 %, which
# a busy test machine always has.
GLOBAL_PREFS = """\
<global_preferences>
  <run_if_user_active>1</run_if_user_active>
  <run_gpu_if_user_active>1</run_gpu_if_user_active>
  <suspend_cpu_usage>0</suspend_cpu_usage>
  <cpu_usage_limit>100</cpu_usage_limit>
  <max_ncpus_pct>100</max_ncpus_pct>
  <leave_apps_in_memory>1</leave_apps_in_memory>
</global_preferences>
"""


def anonymous_app_info(
    path: Path, app: str, version_num: int, main: str, files: dict[str, str] | None = None
) -> Path:
    """A minimal app_info.xml: `main` is the main program, `files` more files
    (physical name -> logical name)."""
    files = files or {}
    infos = "".join(f"  <file_info>\n    <name>{n}</name>\n  </file_info>\n" for n in files)
    refs = "".join(
        f"    <file_ref>\n      <file_name>{n}</file_name>\n      <open_name>{o}</open_name>\n"
        "    </file_ref>\n"
        for n, o in files.items()
    )
    path.write_text(
        f"<app_info>\n  <app>\n    <name>{app}</name>\n  </app>\n"
        f"  <file_info>\n    <name>{main}</name>\n    <executable/>\n  </file_info>\n{infos}"
        f"  <app_version>\n    <app_name>{app}</app_name>\n"
        f"    <version_num>{version_num}</version_num>\n    <platform>{PLATFORM}</platform>\n"
        f"    <file_ref>\n      <file_name>{main}</file_name>\n      <main_program/>\n"
        f"    </file_ref>\n{refs}  </app_version>\n</app_info>\n"
    )
    return path


@dataclass
class RunningClient:
    dir: Path
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def wait_exit(self, timeout: float) -> int:
        """The client's exit status once it exited by itself (exit_when_idle)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the BOINC client did not finish within {timeout:.0f} s:\n{self.log_tail()}"
            ) from None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no client log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the client and every task it started (its process group), by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the client quits its tasks on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # tasks the client left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def running_client(
    data_dir: Path, master_url: str, app_files: list[Path], app_info: Path
) -> Iterator[RunningClient]:
    data_dir.mkdir(parents=True)
    (data_dir / "cc_config.xml").write_text(CC_CONFIG)
    (data_dir / "global_prefs_override.xml").write_text(GLOBAL_PREFS)
    (data_dir / "gui_rpc_auth.cfg").write_text("emulator-test\n")
    attach_anonymous(data_dir, master_url, app_files, app_info)
    port = free_port()
    log = data_dir / "client.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["boinc", "--dir", str(data_dir), "--allow_multiple_clients",
             "--gui_rpc_port", str(port), "--no_info_fetch", "--skip_cpu_benchmarks",
             "--no_gpus", "--exit_when_idle"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    started = time.monotonic()
    try:
        yield RunningClient(data_dir, proc, port, log)
    finally:
        _stop(proc)
        print(f"BOINC client ran {time.monotonic() - started:.1f} s")
