"""The VM wrapper's decisions, without a VM or a client: what each BOINC request and
each console observation makes the wrapper do, and the user data it gives the guest.
(The same loop runs against the real client and QEMU in tests/test_boinc_appliance.py.)
"""

from __future__ import annotations

import tomllib

import pytest

from cvmbuild.boinc import console
from cvmbuild.boinc.api import EXIT_CHILD_FAILED, BoincStatus
from cvmbuild.boinc.jobfile import VmJob
from cvmbuild.boinc.vm_task import Act, Seen, decide, exit_status, fraction_done, user_data

RUNNING = BoincStatus()
JOB = VmJob(minimum_heartbeat_interval=60, minimum_checkpoint_interval=100,
            enable_vm_savestate_usage=True)  # fmt: skip


def seen_at(t: float) -> Seen:
    return Seen(last_line=t, last_checkpoint=t, running_since=t)


def test_abort_wins_over_every_other_request() -> None:
    status = BoincStatus(abort_request=True, quit_request=True, suspended=True)
    assert decide(JOB, status, seen_at(0), 1, vm_exited=True, checkpoint_due=True) is Act.ABORT


@pytest.mark.parametrize("status", [BoincStatus(quit_request=True), BoincStatus(no_heartbeat=True)])
def test_quit_or_a_lost_client_saves_the_vm_and_exits(status: BoincStatus) -> None:
    assert decide(JOB, status, seen_at(0), 1, False, False) is Act.SAVE_AND_EXIT


def test_suspend_pauses_once_and_resume_continues() -> None:
    seen = seen_at(0)
    suspended = BoincStatus(suspended=True)
    assert decide(JOB, suspended, seen, 1, False, False) is Act.PAUSE
    seen.paused = True
    assert decide(JOB, suspended, seen, 500, False, False) is None  # no heartbeat check
    assert decide(JOB, RUNNING, seen, 501, False, False) is Act.RESUME


def test_a_silent_guest_fails_after_the_heartbeat_interval() -> None:
    seen = seen_at(0)
    assert decide(JOB, RUNNING, seen, 59, False, False) is None
    assert decide(JOB, RUNNING, seen, 61, False, False) is Act.SILENT
    seen.observe(console.Heartbeat(), 61)
    assert decide(JOB, RUNNING, seen, 62, False, False) is None


def test_the_job_is_done_when_the_guest_powered_off_after_its_exit() -> None:
    seen = seen_at(0)
    seen.observe(console.JobExit(3), 10)
    assert decide(JOB, RUNNING, seen, 11, vm_exited=False, checkpoint_due=False) is None
    assert decide(JOB, RUNNING, seen, 12, vm_exited=True, checkpoint_due=False) is Act.JOB_DONE
    assert decide(JOB, RUNNING, seen, 500, vm_exited=False, checkpoint_due=False) is Act.JOB_DONE


def test_qemu_exiting_before_the_job_reported_is_a_failure() -> None:
    assert decide(JOB, RUNNING, seen_at(0), 5, vm_exited=True, checkpoint_due=False) is Act.VM_GONE


def test_checkpoints_only_when_due_allowed_and_not_too_often() -> None:
    seen = seen_at(0)
    assert decide(JOB, RUNNING, seen, 50, False, checkpoint_due=True) is None  # too soon
    seen.last_line = 100
    assert decide(JOB, RUNNING, seen, 101, False, checkpoint_due=True) is Act.CHECKPOINT
    assert decide(JOB, RUNNING, seen, 101, False, checkpoint_due=False) is None
    no_savestate = VmJob(minimum_checkpoint_interval=1, enable_vm_savestate_usage=False)
    assert decide(no_savestate, RUNNING, seen, 101, False, checkpoint_due=True) is None


def test_job_duration_is_a_lease_that_ends_in_success_and_sets_progress() -> None:
    lease = VmJob(job_duration=100, minimum_heartbeat_interval=1000)
    seen = Seen(last_line=0, last_checkpoint=0, elapsed_before=40, running_since=0)
    assert fraction_done(lease, seen, 10) == pytest.approx(0.5)
    assert decide(lease, RUNNING, seen, 59, False, False) is None
    assert decide(lease, RUNNING, seen, 60, False, False) is Act.LEASE_OVER
    seen.observe(console.Progress(0.9), 61)
    assert fraction_done(lease, seen, 61) == pytest.approx(0.9)  # the guest knows better


def test_paused_time_does_not_count_as_elapsed() -> None:
    seen = seen_at(0)
    seen.elapsed_before, seen.paused = seen.elapsed(30), True
    assert seen.elapsed(1000) == 30


def test_the_jobs_exit_code_is_the_results_exit_status() -> None:
    assert [exit_status(s) for s in (0, 3, 255, -9, 300)] == [0, 3, 255] + [EXIT_CHILD_FAILED] * 2


def test_user_data_layers_app_version_defaults_under_the_work_units_own() -> None:
    job = VmJob(
        user_data='[repository]\nurl = "http://a"\nname = "sw.example.org"\n[job]\ncommand = "x"\n',
        command_line="python3 /cvmfs/sw.example.org/run.py",
    )
    assert tomllib.loads(user_data(job, None))["job"] == {
        "command": "python3 /cvmfs/sw.example.org/run.py"
    }
    text = user_data(job, '[repository]\nurl = "http://10.0.2.2:8000"\n[job]\ncommand = "y"\n')
    assert tomllib.loads(text) == {
        "repository": {"url": "http://10.0.2.2:8000", "name": "sw.example.org"},
        "job": {"command": "y"},
    }


def test_user_data_that_is_not_toml_is_refused_naming_its_source() -> None:
    with pytest.raises(ValueError, match="user_data_file: not valid TOML"):
        user_data(VmJob(), "[repository\n")
