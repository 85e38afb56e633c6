"""The wrapper's entry point (`__main__` of the zipapp): attach to the BOINC client,
read the job file and run it: host tasks (BOINC's plain wrapper) or the VM.

The job file is the logical name `vm_job.xml`, else `job.xml` (what BOINC's plain
wrapper reads), resolved through the slot's soft links. A job file this wrapper cannot
run ends the task with EXIT_INIT_FAILURE and a one-line message in stderr.txt; a host
without BOINC's library exits with that status too (there is no client to tell).
"""

from __future__ import annotations

import os
import sys

from cvmbuild.boinc.api import EXIT_INIT_FAILURE, BoincApi, BoincApiError
from cvmbuild.boinc.host_tasks import run_host_job
from cvmbuild.boinc.jobfile import HostJob, JobFileError, VmJob, parse

JOB_FILES = ("vm_job.xml", "job.xml")


def read_job(api: BoincApi) -> VmJob | HostJob:
    """The first job file present in the slot, parsed."""
    for logical in JOB_FILES:
        path = api.resolve(logical)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise JobFileError(f"{path}: cannot read the job file ({exc.strerror})") from exc
        return parse(data, path)
    raise JobFileError(
        f"no job file: neither {' nor '.join(JOB_FILES)} is in {os.getcwd()}; "
        "the app version must carry one with that logical name"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the task; returns only when the BOINC library cannot be loaded (the
    library's finish and temporary exit end the process otherwise)."""
    del argv  # the client's command line carries nothing for us (yet)
    try:
        api = BoincApi()
        api.init_wrapper()
    except BoincApiError as exc:
        print(f"cvm_vmwrapper: {exc}", file=sys.stderr, flush=True)
        return EXIT_INIT_FAILURE
    try:
        job = read_job(api)
    except JobFileError as exc:
        api.finish(EXIT_INIT_FAILURE, f"bad job file: {exc}")
    if isinstance(job, HostJob):
        run_host_job(api, job)
    try:
        from cvmbuild.boinc.vm_task import run_vm
    except ImportError as exc:
        api.finish(
            EXIT_INIT_FAILURE,
            f"this wrapper build cannot run <vm_job> files ({exc}); use one with VM support",
        )
    run_vm(api, job)
    raise AssertionError("run_vm returned")  # it finishes or exits temporarily


if __name__ == "__main__":
    raise SystemExit(main())
