"""The BOINC wrapper (cvmbuild/boinc) with host tasks: its job file, its zipapp, and the
real BOINC client (7.20) driving it: progress, suspend in memory, suspend as quit and
restart, abort, a killed client, a failing task, a bad job file."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cvmbuild.boinc import api, host_tasks, jobfile
from cvmbuild.boinc.jobfile import HostJob, HostTask, JobFileError, VmJob
from cvmbuild.boinc.zipapp import build_zipapp
from tests.boinc_client import (
    AppFile,
    BoincClient,
    Prefs,
    alive,
    boinc_client,
    process_state,
    processes_under,
    wait_until,
)

BOINC_PACKAGE = Path(api.__file__).parent

# A host task: counts STEPS times every INTERVAL seconds (the count in LOG/TAG.count),
# writes its progress to progress.txt and a line to out.txt, exits with CODE.
PAYLOAD = f"""#!{sys.executable}
import os, sys, time
steps, interval, code, tag = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = os.environ["PAYLOAD_LOG"]
with open(f"{{log}}/starts.txt", "a") as f:
    f.write(f"{{tag}} {{os.getpid()}} {{os.getppid()}}\\n")
for i in range(1, steps + 1):
    time.sleep(interval)
    with open(f"{{log}}/{{tag}}.count", "w") as f:
        f.write(str(i))
    with open("progress.txt", "a") as f:
        f.write(f"{{i / steps}}\\n")
with open("out.txt", "a") as f:
    f.write(f"{{tag}} counted to {{steps}}\\n")
sys.exit(code)
"""


def task_xml(log: Path, steps: int, interval: float, tag: str, code: int = 0) -> str:
    return (
        f"<task><application>payload</application>"
        f"<command_line>{steps} {interval} {code} {tag}</command_line>"
        f"<setenv>PAYLOAD_LOG={log}</setenv>"
        "<fraction_done_filename>progress.txt</fraction_done_filename></task>"
    )


class Payload:
    """What the payload processes left in their log directory."""

    def __init__(self, log: Path):
        self.log = log

    def starts(self) -> list[tuple[str, int, int]]:
        path = self.log / "starts.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(tag, int(pid), int(ppid)) for tag, pid, ppid in map(str.split, lines)]

    def started(self, tag: str, times: int = 1) -> tuple[int, int] | None:
        """(pid, wrapper pid) of the tag's `times`-th start, once it happened."""
        runs = [(pid, ppid) for name, pid, ppid in self.starts() if name == tag]
        return runs[times - 1] if len(runs) >= times else None

    def count(self, tag: str) -> int:
        path = self.log / f"{tag}.count"
        return int(path.read_text() or 0) if path.exists() else 0


@contextmanager
def wrapper_job(
    tmp_path: Path, job: str, prefs: Prefs | None = None
) -> Iterator[tuple[BoincClient, Payload]]:
    """The zipapp as an app version's main program with `job` as its vm_job.xml and
    the payload as `payload`, run by a real client."""
    log = tmp_path / "log"
    log.mkdir()
    wrapper = build_zipapp(tmp_path / "cvm_vmwrapper.pyz")
    files = [
        AppFile(wrapper.name, wrapper.read_bytes(), executable=True, main_program=True),
        AppFile("cvm_job.xml", job.encode(), "vm_job.xml"),
        AppFile("payload.py", PAYLOAD.encode(), "payload", executable=True),
    ]
    with boinc_client(tmp_path / "boinc", files, ["out.txt"], prefs or Prefs()) as client:
        yield client, Payload(log)


def host_job(*tasks: str) -> str:
    return f"<job_desc>{''.join(tasks)}</job_desc>"


# --- the job file ---------------------------------------------------------------


def test_vm_job_file_gives_typed_settings_with_vboxwrapper_names() -> None:
    job = jobfile.parse(
        "<vm_job><image>img.qcow2</image><memory_size_mb>1024</memory_size_mb>"
        "<cpus>2</cpus><job_duration>3600</job_duration><enable_vm_savestate_usage/>"
        "<enable_network>0</enable_network><copy_to_guest>a.txt</copy_to_guest>"
        "<copy_to_guest>b.txt</copy_to_guest><copy_from_guest>result.tar</copy_from_guest>"
        "<command_line>run.sh --fast</command_line><user_data>[job]\ncommand = 'x'</user_data>"
        "<minimum_heartbeat_interval>120</minimum_heartbeat_interval>"
        "<minimum_checkpoint_interval>300</minimum_checkpoint_interval>"
        "<output_disk_mb>64</output_disk_mb><user_data_file>ud.toml</user_data_file>"
        "<copilot_url>https://pilot.example/</copilot_url></vm_job>"
    )
    assert job == VmJob(
        image="img.qcow2",
        memory_size_mb=1024,
        cpus=2,
        job_duration=3600.0,
        minimum_heartbeat_interval=120.0,
        minimum_checkpoint_interval=300.0,
        enable_vm_savestate_usage=True,
        enable_network=False,
        command_line="run.sh --fast",
        user_data="[job]\ncommand = 'x'",
        user_data_file="ud.toml",
        copy_to_guest=("a.txt", "b.txt"),
        copy_from_guest=("result.tar",),
        output_disk_mb=64,
        copilot_url="https://pilot.example/",
    )
    assert jobfile.parse("<vm_job/>") == VmJob()


def test_plain_wrapper_job_file_gives_host_tasks() -> None:
    job = jobfile.parse(
        "<job_desc><task><application>worker</application>"
        "<command_line>--in a 'b c'</command_line><stdin_filename>in</stdin_filename>"
        "<stdout_filename>out</stdout_filename><stderr_filename>err</stderr_filename>"
        "<setenv>A=1</setenv><setenv>B=x=y</setenv><weight>3</weight>"
        "<fraction_done_filename>fd</fraction_done_filename>"
        "<checkpoint_filename>ck</checkpoint_filename><time_limit>60</time_limit></task>"
        "<task><application>post</application></task></job_desc>"
    )
    assert job == HostJob(
        (
            HostTask(
                application="worker",
                command_line="--in a 'b c'",
                stdin_filename="in",
                stdout_filename="out",
                stderr_filename="err",
                setenv=(("A", "1"), ("B", "x=y")),
                weight=3.0,
                fraction_done_filename="fd",
                checkpoint_filename="ck",
                time_limit=60.0,
            ),
            HostTask(application="post"),
        )
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<vm_job><memory_size>512</memory_size></vm_job>", "unknown tag <memory_size>"),
        ("<vm_job><cpus>two</cpus></vm_job>", "<cpus> must be a whole number, not 'two'"),
        ("<vm_job><cpus>0</cpus></vm_job>", "<cpus> must be positive"),
        ("<vm_job><job_duration>-1</job_duration></vm_job>", "<job_duration> must be"),
        ("<vm_job><enable_network>maybe</enable_network></vm_job>", "<enable_network> must"),
        ("<vm_job><cpus>1</cpus><cpus>2</cpus></vm_job>", "<cpus> is given twice"),
        ("<vm_job><image><a/></image></vm_job>", "<image> must hold text"),
        ("<job_desc><task><application>a</application><daemon/></task></job_desc>", "<daemon>"),
        ("<job_desc><task><weight>1</weight></task></job_desc>", "<application> is missing"),
        (
            "<job_desc><task><application>a</application><setenv>A</setenv></task></job_desc>",
            "<setenv> must be NAME=VALUE",
        ),
        ("<job_desc><unzip_input/></job_desc>", "<unzip_input> (BOINC's wrapper) is not"),
        ("<job_desc/>", "has no <task>"),
        ("<job>", "not well-formed XML"),
        ("<job/>", "the root element is <job>"),
    ],
)
def test_job_file_mistakes_name_the_file_and_the_tag(text: str, message: str) -> None:
    with pytest.raises(JobFileError) as error:
        jobfile.parse(text, "slots/0/vm_job.xml")
    assert str(error.value).startswith("slots/0/vm_job.xml: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_progress_and_checkpoint_files_read_as_boincs_wrapper_reads_them() -> None:
    assert host_tasks.last_fraction("0.1\n0.25\n") == 0.25
    assert host_tasks.last_fraction("step 3 of 4: 7.5e-1\n") == 0.75
    assert host_tasks.last_fraction("") is None
    assert host_tasks.last_fraction("1.7") == 1.0
    job = HostJob((HostTask("a", weight=1), HostTask("b", weight=3)))
    assert host_tasks.job_fraction(job, 1, 0.5) == pytest.approx(0.625)
    checkpoint = host_tasks.Checkpoint(1, 2.5, 10.0)
    text = host_tasks.format_checkpoint(checkpoint)
    assert host_tasks.parse_checkpoint(text) == checkpoint
    assert host_tasks.parse_checkpoint("garbage") == host_tasks.Checkpoint()


# --- the zipapp and the binding ---------------------------------------------------


def test_zipapp_is_the_same_bytes_whenever_it_is_built(tmp_path: Path) -> None:
    first = build_zipapp(tmp_path / "a.pyz").read_bytes()
    for source in BOINC_PACKAGE.glob("*.py"):
        source.touch()
    second = build_zipapp(tmp_path / "b.pyz").read_bytes()
    assert first == second
    assert first.startswith(b"#!/usr/bin/env python3\n")


def test_wrapper_imports_nothing_but_the_standard_library() -> None:
    for source in sorted(BOINC_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in sys.stdlib_module_names or (
                    name == "cvmbuild.boinc" or name.startswith("cvmbuild.boinc.")
                ), f"{source.name} imports {name}"


def test_zipapp_runs_with_only_the_standard_library(tmp_path: Path) -> None:
    """`-I -S`: no site-packages at all (plain -I still sees a venv's), no cwd on the
    path; standalone (no client), with a host task job file in its directory."""
    wrapper = build_zipapp(tmp_path / "cvm_vmwrapper.pyz")
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "job.xml").write_text(
        "<job_desc><task><application>/bin/sh</application>"
        "<command_line>-c 'echo $GREETING > out.txt'</command_line>"
        "<setenv>GREETING=hello</setenv></task></job_desc>"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-S", str(wrapper)], cwd=slot, capture_output=True, timeout=60
    )
    assert run.returncode == 0, (slot / "stderr.txt").read_text()
    assert (slot / "out.txt").read_text() == "hello\n"
    assert (slot / "boinc_finish_called").read_text().splitlines()[0] == "0"
    assert (slot / "wrapper_checkpoint.txt").read_text().startswith("1 ")

    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run(
        [sys.executable, "-I", "-S", str(wrapper)], cwd=empty, capture_output=True, timeout=60
    )
    assert run.returncode == api.EXIT_INIT_FAILURE
    assert "no job file: neither vm_job.xml nor job.xml" in (empty / "stderr.txt").read_text()


def test_standalone_job_skips_finished_tasks_and_honours_stdio_and_time_limit(
    tmp_path: Path,
) -> None:
    """Run from the source tree without a client: the checkpoint file says one task
    is done, so the job starts at the second; its stdio go to the named files; the
    third outlives its time limit, is stopped and counts as done (BOINC's rule); what
    the fourth leaves running in the background is killed when it exits."""
    (tmp_path / "job.xml").write_text(
        "<job_desc>"
        "<task><application>/bin/sh</application><command_line>-c 'exit 9'</command_line>"
        "</task>"
        "<task><application>/bin/sh</application>"
        "<command_line>-c 'tr a-z A-Z; echo oops >&amp;2'</command_line>"
        "<stdin_filename>in.txt</stdin_filename><stdout_filename>out.txt</stdout_filename>"
        "<stderr_filename>err.txt</stderr_filename></task>"
        "<task><application>/bin/sleep</application><command_line>600</command_line>"
        "<time_limit>1</time_limit></task>"
        "<task><application>/bin/sh</application>"
        "<command_line>-c 'sleep 600 &amp; echo $! > background.pid'</command_line></task>"
        "</job_desc>"
    )
    (tmp_path / "wrapper_checkpoint.txt").write_text("1 0.000000 0.000000\n")
    (tmp_path / "in.txt").write_text("shout\n")
    started = time.monotonic()
    background = tmp_path / "background.pid"
    try:
        # stdio to files: a pipe would wait for a background process left alive
        with open(tmp_path / "console.txt", "wb") as console:
            run = subprocess.run(
                [sys.executable, "-m", "cvmbuild.boinc.wrapper"],
                cwd=tmp_path,
                stdout=console,
                stderr=console,
                timeout=60,
            )
    finally:
        if background.exists() and alive(pid := int(background.read_text())):
            os.kill(pid, signal.SIGKILL)
    assert run.returncode == 0, (tmp_path / "stderr.txt").read_text()
    assert time.monotonic() - started < 30
    assert (tmp_path / "out.txt").read_text() == "SHOUT\n"
    assert (tmp_path / "err.txt").read_text() == "oops\n"
    assert (tmp_path / "wrapper_checkpoint.txt").read_text().startswith("4 ")
    assert not alive(int(background.read_text()))
    assert "reached its time limit of 1 s" in (tmp_path / "stderr.txt").read_text()


def test_binding_standalone_resolves_names_as_themselves_and_finish_leaves_its_file(
    tmp_path: Path,
) -> None:
    script = (
        "from cvmbuild.boinc.api import BoincApi\n"
        "api = BoincApi(); api.init_wrapper()\n"
        "assert api.is_standalone()\n"
        "assert api.resolve('vm_job.xml') == 'vm_job.xml'\n"
        "status = api.status()\n"
        "assert not (status.suspended or status.quit_request or status.abort_request)\n"
        "api.report_status(1.0, 0.5, 0.5)\n"
        "api.finish(7, 'seven')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True)
    assert run.returncode == 7, run.stderr
    assert (tmp_path / "boinc_finish_called").read_text().splitlines()[:2] == ["7", "seven"]
    assert "seven" in (tmp_path / "stderr.txt").read_text()


# --- under the real BOINC client ---------------------------------------------------


def test_task_reports_progress_and_its_output_reaches_the_project(tmp_path: Path) -> None:
    log = tmp_path / "log"
    job = host_job(task_xml(log, 16, 0.25, "A"))
    with wrapper_job(tmp_path, job) as (client, payload):
        seen = wait_until(
            lambda: (f := float(client.task().get("fraction done", 0))) >= 0.3 and f < 1 and f,
            30,
            "progress from the task in boinccmd --get_tasks",
        )
        assert 0.3 <= seen < 1
        task = client.wait_finished(60)
        assert task["exit_status"] == "0"
        assert (client.project_dir / "wu1_0_0").read_text() == "A counted to 16\n"
        assert float(task["final CPU time"]) > 0  # the task's, from report_status
        assert len(payload.starts()) == 1


def test_suspend_in_memory_stops_the_task_and_resume_continues_it(tmp_path: Path) -> None:
    log = tmp_path / "log"
    job = host_job(task_xml(log, 28, 0.25, "A"))
    with wrapper_job(tmp_path, job, Prefs(leave_apps_in_memory=True)) as (client, payload):
        pid, wrapper = wait_until(lambda: payload.started("A"), 30, "the task to start")
        wait_until(lambda: payload.count("A") >= 2, 30, "the task to count")
        client.task_op("suspend")
        wait_until(lambda: process_state(pid) == "T", 15, "the task to be stopped")
        stopped_at = payload.count("A")
        time.sleep(2)  # eight steps of the payload's clock
        assert payload.count("A") == stopped_at
        assert process_state(wrapper) != "T"
        client.task_op("resume")
        wait_until(lambda: payload.count("A") > stopped_at, 15, "the task to count again")
        task = client.wait_finished(60)
        assert task["exit_status"] == "0"
        assert (client.project_dir / "wu1_0_0").read_text() == "A counted to 28\n"
        assert len(payload.starts()) == 1


def test_suspend_as_quit_restarts_at_the_next_task(tmp_path: Path) -> None:
    """With default preferences a suspend removes the task from memory: the wrapper
    kills its task and exits; resumed, it skips the task that had finished."""
    log = tmp_path / "log"
    job = host_job(task_xml(log, 2, 0.2, "A"), task_xml(log, 20, 0.25, "B"))
    with wrapper_job(tmp_path, job) as (client, payload):
        pid, wrapper = wait_until(lambda: payload.started("B"), 30, "the second task")
        wait_until(lambda: payload.count("B") >= 2, 30, "the second task to count")
        client.task_op("suspend")
        wait_until(lambda: not alive(wrapper) and not alive(pid), 30, "the wrapper to quit")
        assert (client.slot / "wrapper_checkpoint.txt").read_text().startswith("1 ")
        assert "exit_status" not in client.task()
        client.task_op("resume")
        wait_until(lambda: payload.started("B", times=2), 30, "the second task to restart")
        task = client.wait_finished(60)
        assert task["exit_status"] == "0"
        assert [tag for tag, _, _ in payload.starts()] == ["A", "B", "B"]
        assert (client.project_dir / "wu1_0_0").read_text() == ("A counted to 2\nB counted to 20\n")


def test_abort_kills_the_task(tmp_path: Path) -> None:
    log = tmp_path / "log"
    job = host_job(task_xml(log, 200, 0.25, "A"))
    with wrapper_job(tmp_path, job) as (client, payload):
        pid, wrapper = wait_until(lambda: payload.started("A"), 30, "the task to start")
        client.task_op("abort")
        task = client.wait_finished(30)
        # The client records its own status for an abort from the GUI (RPC), whatever
        # the wrapper exits with: EXIT_ABORTED_VIA_GUI.
        assert task["state"] == "aborted"
        assert task["exit_status"] == "203"
        # Well before the client's own ABORT_TIMEOUT (60 s), after which it would
        # kill them itself: the wrapper acted on the abort request.
        wait_until(lambda: not alive(pid) and not alive(wrapper), 15, "the task to die")


def test_killed_client_takes_the_wrapper_and_its_task_along(tmp_path: Path) -> None:
    log = tmp_path / "log"
    job = host_job(task_xml(log, 400, 0.25, "A"))
    with wrapper_job(tmp_path, job) as (client, payload):
        pid, wrapper = wait_until(lambda: payload.started("A"), 30, "the task to start")
        client.kill()
        started = time.monotonic()
        wait_until(lambda: not alive(pid) and not alive(wrapper), 15, "wrapper and task to go")
        print(f"wrapper and task gone {time.monotonic() - started:.1f} s after kill -9")
        assert not processes_under(client.root)


def test_task_dies_with_a_killed_wrapper(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: even a wrapper killed outright leaves no task behind."""
    log = tmp_path / "log"
    job = host_job(task_xml(log, 400, 0.25, "A"))
    with wrapper_job(tmp_path, job) as (client, payload):
        pid, wrapper = wait_until(lambda: payload.started("A"), 30, "the task to start")
        os.kill(wrapper, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, "the task to die with its wrapper")


def test_failing_task_gives_its_exit_code_to_the_result(tmp_path: Path) -> None:
    log = tmp_path / "log"
    job = host_job(task_xml(log, 2, 0.1, "A", code=3), task_xml(log, 2, 0.1, "B"))
    with wrapper_job(tmp_path, job) as (client, payload):
        task = client.wait_finished(60)
        assert task["state"] == "compute error"
        assert task["exit_status"] == "3"
        assert [tag for tag, _, _ in payload.starts()] == ["A"]
        client.stop()
        stderr = client.stored_result().findtext("stderr_out") or ""
        assert "task 1 (payload) failed with exit status 3" in stderr


def test_bad_job_file_fails_the_task_with_a_clear_message(tmp_path: Path) -> None:
    with wrapper_job(tmp_path, "<vm_job><cpu>2</cpu></vm_job>") as (client, payload):
        task = client.wait_finished(60)
        assert task["state"] == "compute error"
        assert task["exit_status"] == str(api.EXIT_INIT_FAILURE)
        client.stop()
        stderr = client.stored_result().findtext("stderr_out") or ""
        assert "bad job file: " in stderr
        assert "vm_job.xml: unknown tag <cpu> in <vm_job>" in stderr
        assert payload.starts() == []
