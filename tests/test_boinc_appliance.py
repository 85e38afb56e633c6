"""The paper's volunteer host, end to end: the real BOINC client (7.20.5) attaches to a
project (tests/boinc_project.py, a scheduler emulator), runs the app `cvmbuild export
--format boinc` made (our VM wrapper booting the thin appliance under QEMU), the job
runs a program from a repository served on the loopback, and the output is uploaded
and reported. Then what a volunteer's machine does to a task: suspend and resume, a
client that quits mid-job (the VM is saved and restored on its next start), abort,
and a client killed outright. Last, the paper's volunteer cloud: the appliance under
BOINC pulls its jobs from the Co-Pilot manager. No QEMU may outlive any of it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.appliance_fixtures import Built, Served
from tests.boinc_client import processes_under, wait_until
from tests.boinc_project import (
    RESULT_FILES_UPLOADED,
    EmulatedJob,
    InputFile,
    OutputFile,
    SchedulerEmulator,
    exported_app,
    scheduler_emulator,
)
from tests.boinc_running import RunningClient, running_client
from tests.copilot_fixtures import Manager

pytestmark = pytest.mark.slow  # each test boots the appliance under TCG

HELLO = "python3 /cvmfs/sw.example.org/sw/hello/1.0/bin/hello.py"
# Counts to N, one line a second, with its progress in the file the agent relays.
COUNT = (
    "n=0; while [ $n -lt {n} ]; do n=$((n+1)); echo $n >> result.txt; "
    "echo $n {n} | awk '{{print $1/$2}}' > .progress; sleep 1; done"
)


@dataclass
class Volunteer:
    project: SchedulerEmulator
    client: RunningClient
    job: EmulatedJob

    @property
    def slot(self) -> Path:
        return self.client.dir / "slots" / "0"

    def console(self) -> str:
        path = self.slot / "vm_console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stderr(self) -> str:
        path = self.slot / "stderr.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_op(self, op: str) -> None:
        self.client.client.rpc("--task", self.project.master_url, self.job.result_name, op)

    def qemu(self) -> list[int]:
        return [pid for pid, cmd in processes_under(self.client.dir).items() if "qemu" in cmd]

    def wait_console(self, text: str, timeout: float = 240) -> None:
        wait_until(lambda: text in self.console(), timeout, f"{text!r} on the console")

    def progress(self) -> float:
        """The last progress the guest relayed on its console."""
        found = re.findall(r"CVMAPPLIANCE: progress ([0-9.]+)", self.console())
        return float(found[-1]) if found else 0.0


def vm_job(served: Served, name: str, command: str) -> EmulatedJob:
    user_data = served.user_data(command).encode()
    return EmulatedJob(
        name=name,
        app_name="cvm-thin",
        version_num=100,
        plan_class="qemu",
        inputs=(InputFile(f"{name}_user-data", user_data, "user-data"),),
        outputs=(OutputFile("result.txt"),),
    )


@contextmanager
def volunteer(built: Built, tmp_path: Path, job: EmulatedJob) -> Iterator[Volunteer]:
    files, app_info = exported_app(built.dir / "cvm-thin.boinc")
    with scheduler_emulator([job]) as project:
        with running_client(tmp_path / "client", project.master_url, files, app_info) as client:
            yield Volunteer(project, client, job)


def test_a_volunteer_runs_a_repository_program_in_the_exported_appliance(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    job = vm_job(served_repository, "hello1", f"{HELLO} > result.txt")
    with volunteer(built, tmp_path, job) as host:
        host.client.wait_exit(timeout=600)
        report = host.project.reports[job.result_name]
        assert (report.exit_status, report.state) == (0, RESULT_FILES_UPLOADED), (
            report.stderr_out,
            host.client.log_tail(),
        )
        uploaded = host.project.uploads[job.output_name(job.outputs[0])]
        assert uploaded == b"hello from the repository on cvm-thin\n"
        assert "booting the VM" in report.stderr_out
        assert not host.qemu()


def test_a_task_pauses_then_resumes_from_its_saved_vm_after_the_client_quit(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    """A suspend keeps a task that has not checkpointed in memory (the client removes
    only checkpointed tasks): the VM is paused. A client that quits (the volunteer's
    machine shuts down) makes the wrapper save the VM; the next client start restores
    it, and the job ends with the output of one uninterrupted run."""
    job = vm_job(served_repository, "count1", COUNT.format(n=25))
    with volunteer(built, tmp_path, job) as host:
        wait_until(lambda: host.progress() >= 0.2, 240, "the job to be 5 lines in")
        host.task_op("suspend")
        wait_until(lambda: "vm_task: pause" in host.stderr(), 30, "the VM to be paused")
        paused_at = host.progress()
        time.sleep(8)  # the guest relays its progress every 5 s while it runs
        assert host.progress() == paused_at and host.qemu()
        host.task_op("resume")
        wait_until(lambda: host.progress() > paused_at, 60, "the job to go on")

        host.client.client.stop()  # `boinccmd --quit`: every task is asked to quit
        assert not host.qemu()
        assert "VM state saved" in host.stderr()
        host.client.client.start()
        host.client.wait_exit(timeout=600)
        report = host.project.reports[job.result_name]
        assert report.exit_status == 0, (report.stderr_out, host.client.log_tail())
        assert "restored the VM from its checkpoint" in report.stderr_out
        # 1 to 25 once: a reboot would have run the job again from 1 after the quit
        uploaded = host.project.uploads[job.output_name(job.outputs[0])]
        assert uploaded == "".join(f"{n}\n" for n in range(1, 26)).encode()


def test_an_aborted_task_stops_its_vm_and_reports_the_abort(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    job = vm_job(served_repository, "abort1", COUNT.format(n=300))
    with volunteer(built, tmp_path, job) as host:
        host.wait_console("CVMAPPLIANCE: job start")
        host.task_op("abort")
        host.client.wait_exit(timeout=240)
        report = host.project.reports[job.result_name]
        assert report.exit_status == 203  # EXIT_ABORTED_VIA_GUI, as the client records it
        assert not host.qemu()


def test_a_killed_client_leaves_no_vm_running(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    job = vm_job(served_repository, "kill1", COUNT.format(n=300))
    with volunteer(built, tmp_path, job) as host:
        host.wait_console("CVMAPPLIANCE: job start")
        assert host.qemu()
        host.client.client.kill()
        wait_until(lambda: not processes_under(host.client.dir), 60, "the wrapper and QEMU to go")
        # the wrapper saw its client vanish and kept the VM's state for the next start
        assert "VM state saved" in host.stderr()


def test_the_volunteer_cloud_a_boinc_task_runs_the_jobs_it_pulls_from_copilot(
    built: Built, served_repository: Served, manager: Manager, tmp_path: Path
) -> None:
    """The paper's §8 end to end: a volunteer's BOINC client runs the appliance through
    the VM wrapper; inside, the Co-Pilot agent pulls two jobs from the manager (outbound
    only, to the host's loopback), runs a program from the repository for each, uploads
    its output to the manager, and leaves when idle; the BOINC task's own result lists
    the jobs this VM ran."""
    repository = {
        "name": "sw.example.org",
        "url": served_repository.url,
        "public_key": served_repository.key.read_text(),
        "paths": ["/sw/hello/1.0"],
    }
    job = {"command": f"{HELLO} > out.txt", "repositories": [repository], "outputs": ["out.txt"]}
    ids = manager.submit(job, job)
    port = manager.url.rsplit(":", 1)[1]
    copilot = (
        f'[copilot]\nurl = "http://10.0.2.2:{port}"\ntoken = "{manager.agent_token}"\n'
        'idle_exit_s = "10"\nname = "volunteer-1"\nsummary_file = "result.txt"\n'
    )
    work_unit = EmulatedJob(
        name="cloud1",
        app_name="cvm-thin",
        version_num=100,
        plan_class="qemu",
        inputs=(
            InputFile(
                "cloud1_user-data",
                (served_repository.user_data("") + copilot).encode(),
                "user-data",
            ),
        ),  # fmt: skip
        outputs=(OutputFile("result.txt"),),
    )
    with volunteer(built, tmp_path, work_unit) as host:
        host.client.wait_exit(timeout=600)
        report = host.project.reports[work_unit.result_name]
        assert report.exit_status == 0, (report.stderr_out, host.client.log_tail())
        summary = host.project.uploads[work_unit.output_name(work_unit.outputs[0])].decode()
        assert sorted(summary.splitlines()) == sorted(f"{i} 0 done" for i in ids)
        assert not host.qemu()
    for job_id in ids:
        state = manager.job(job_id)
        assert (state["state"], state["agent"]) == ("done", "volunteer-1"), state
        answer = manager.submitter("GET", f"/jobs/{job_id}/outputs/out.txt")
        assert answer.content == b"hello from the repository on cvm-thin\n"
