"""The scheduler emulator (tests/boinc_project.py) with the real BOINC client 7.20.5:
a small Python app on the BOINC API binding, under the anonymous platform, goes
attach → download → run → upload → report, and the emulator sees it all; then the same
with the wrapper zipapp `export --format boinc` ships, running a plain-wrapper job."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cvmbuild.boinc.zipapp import build_zipapp
from tests.boinc_project import (
    RESULT_FILES_UPLOADED,
    EmulatedJob,
    InputFile,
    OutputFile,
    scheduler_emulator,
)
from tests.boinc_running import anonymous_app_info, running_client

APP = "cvm-emutest"
APP_SOURCE = """\
import sys

from cvmbuild.boinc.api import BoincApi

api = BoincApi()
api.init_wrapper()
with open(api.resolve("in.txt")) as f:
    text = f.read()
with open(api.resolve("out.txt"), "w") as f:
    f.write(text.upper())
api.report_status(0.1, 0.1, 1.0)
print("emulator test app: wrote", len(text), "characters", file=sys.stderr, flush=True)
api.finish(0)
"""


@pytest.mark.slow  # the client's own delays: about 25 s
def test_emulator_takes_a_job_through_the_whole_loop_with_the_real_client(tmp_path: Path) -> None:
    program = tmp_path / "app" / "emutest.py"
    program.parent.mkdir()
    program.write_text(f"#!{sys.executable}\n{APP_SOURCE}")
    program.chmod(0o755)
    app_info = anonymous_app_info(tmp_path / "app" / "app_info.xml", APP, 100, program.name)
    job = EmulatedJob(
        name="emu1",
        app_name=APP,
        version_num=100,
        inputs=(InputFile("emu1_in.txt", b"hello volunteer\n", "in.txt"),),
        outputs=(OutputFile("out.txt"),),
    )

    with scheduler_emulator([job]) as project:
        with running_client(tmp_path / "client", project.master_url, [program], app_info) as client:
            client.wait_exit(timeout=240)

        assert job.name in project.sent
        report = project.reports[job.result_name]
        assert report.exit_status == 0, client.log_tail()
        assert report.state == RESULT_FILES_UPLOADED
        assert "emulator test app: wrote 16 characters" in report.stderr_out
        assert project.uploads[job.output_name(job.outputs[0])] == b"HELLO VOLUNTEER\n"


@pytest.mark.slow  # the client's own delays: about 25 s
def test_the_wrapper_zipapp_runs_a_plain_wrapper_job_through_the_whole_loop(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    wrapper = build_zipapp(app / "cvm_vmwrapper_test.pyz")
    (app / "cvm_job_test.xml").write_text(
        "<job_desc><task><application>/bin/sh</application>"
        "<command_line>-c 'tr a-z A-Z'</command_line>"
        "<stdin_filename>in.txt</stdin_filename><stdout_filename>out.txt</stdout_filename>"
        "</task></job_desc>\n"
    )
    app_info = anonymous_app_info(
        app / "app_info.xml", "cvm-wrapped", 100, wrapper.name,
        {"cvm_job_test.xml": "job.xml"},
    )  # fmt: skip
    job = EmulatedJob(
        name="wrapped1",
        app_name="cvm-wrapped",
        version_num=100,
        inputs=(InputFile("wrapped1_in.txt", b"hello from the host\n", "in.txt"),),
        outputs=(OutputFile("out.txt"),),
    )
    files = [wrapper, app / "cvm_job_test.xml"]
    with scheduler_emulator([job]) as project:
        with running_client(tmp_path / "client", project.master_url, files, app_info) as client:
            client.wait_exit(timeout=240)

        report = project.reports[job.result_name]
        assert (report.exit_status, report.state) == (0, RESULT_FILES_UPLOADED), report.stderr_out
        assert project.uploads[job.output_name(job.outputs[0])] == b"HELLO FROM THE HOST\n"
