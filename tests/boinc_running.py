"""The real BOINC client (7.20.5, Debian's boinc-client) attached to the scheduler
emulator (tests/boinc_project.py) with an anonymous-platform app: started and stopped by
tests/boinc_client.py's BoincClient (own data directory, --allow_multiple_clients, a
free GUI RPC port, its own password, stopped by PID), configured here for a project
that is reached over the network: no unsigned_apps_ok (which turns off all transfers),
no CPU benchmarks, no GPUs, no project list fetch, preferences that never suspend for
other load, and exit_when_idle (which also reports results at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.boinc_client import PASSWORD, BoincClient, processes_under
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
  <run_on_batteries>1</run_on_batteries>
  <idle_time_to_run>0</idle_time_to_run>
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
    client: BoincClient

    @property
    def dir(self) -> Path:
        return self.client.root

    @property
    def log(self) -> Path:
        return self.client.log_file

    def wait_exit(self, timeout: float) -> int:
        """The client's exit status once it exited by itself (exit_when_idle)."""
        assert self.client.process is not None
        try:
            return self.client.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the BOINC client did not finish within {timeout:.0f} s:\n{self.log_tail()}"
            ) from None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.client.log().splitlines()[-lines:])


@contextmanager
def running_client(
    data_dir: Path, master_url: str, app_files: list[Path], app_info: Path
) -> Iterator[RunningClient]:
    """A client attached to the project at master_url with the anonymous-platform app
    (app_info.xml and its files); stopped at the end, and no process left under its
    directory (leftovers are killed by PID and fail the test), as tests/boinc_client.py."""
    data_dir.mkdir(parents=True)
    (data_dir / "cc_config.xml").write_text(CC_CONFIG)
    (data_dir / "global_prefs_override.xml").write_text(GLOBAL_PREFS)
    (data_dir / "gui_rpc_auth.cfg").write_text(PASSWORD + "\n")
    attach_anonymous(data_dir, master_url, app_files, app_info)
    client = BoincClient(data_dir, free_port())
    try:
        client.start()
        yield RunningClient(client)
    finally:
        client.stop()
        leftovers = processes_under(data_dir)
        for pid in leftovers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind by the client: {leftovers}"
