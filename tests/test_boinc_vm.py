"""The VM wrapper's QEMU side: the appliance boots in a slot directory from a qcow2
overlay, gets its user data and input files on a config drive, reports heartbeats and
progress on its console, leaves its outputs on an output disk, pauses, saves its state
and continues from it, and never outlives the process that started it.

The fast tests cover the pure parts (console protocol, the guest agent's progress and
vboxwrapper files, QEMU's command line) and QMP against a QEMU that boots nothing; the
slow ones boot the appliance built from this tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmbuild.appliance import guest_agent
from cvmbuild.boinc import console
from cvmbuild.boinc.qmp import Qmp, QmpError
from cvmbuild.boinc.tools import ToolError, run
from cvmbuild.boinc.vm import CONFIG_DRIVE, OVERLAY, STATE_FILE, Vm, VmError, fat_paths, qemu_argv
from cvmbuild.boinc.vm_task import start_vm
from tests.appliance_fixtures import Served
from tests.conftest import running, wait_gone

MiB = 1024 * 1024

# -- the console protocol -------------------------------------------------------------


def test_console_lines_become_events_and_other_lines_none() -> None:
    lines = [
        "[    2.1] virtio_blk virtio2: [vdc] 2097152 512-byte logical blocks",
        "CVMAPPLIANCE: agent started, uptime 6.7 s",
        "CVMAPPLIANCE: heartbeat",
        "CVMAPPLIANCE: mounted sw.example.org revision 3 at /cvmfs/sw.example.org",
        "CVMAPPLIANCE: job start: python3 job.py --n 3",
        "half a line from the jobCVMAPPLIANCE: progress 0.2500",
        "CVMAPPLIANCE: progress 1.5",
        "CVMAPPLIANCE: progress lots",
        "CVMAPPLIANCE: job exit -9 after 3.0 s\r",
        "CVMAPPLIANCE: outputs written",
        "CVMAPPLIANCE: error: mounting sw.example.org failed: timeout",
        "CVMAPPLIANCE: no job to run",
        "CVMAPPLIANCE: powering off",
    ]
    assert [console.parse(line) for line in lines] == [
        None,
        console.Other("agent started, uptime 6.7 s"),
        console.Heartbeat(),
        console.Mounted("sw.example.org", 3),
        console.JobStart("python3 job.py --n 3"),
        console.Progress(0.25),
        console.Progress(1.0),
        console.Other("progress lots"),
        console.JobExit(-9),
        console.OutputsWritten(),
        console.Error("mounting sw.example.org failed: timeout"),
        console.NoJob(),
        console.PoweringOff(),
    ]


# -- the guest agent's side: job directory, progress, vboxwrapper's files ----------------


def test_the_last_number_in_the_progress_file_counts_within_zero_and_one() -> None:
    assert guest_agent.parse_progress("0.1\n0.25\n") == 0.25
    assert guest_agent.parse_progress("done: 3e-1") == 0.3
    assert guest_agent.parse_progress("120") == 1.0
    assert guest_agent.parse_progress("-0.5") == 0.0
    assert guest_agent.parse_progress("starting\n") is None


def test_the_job_learns_its_directory_and_progress_file() -> None:
    env = guest_agent.JobPlace().environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "CVM_JOB_DIR": "/run/job",
                   "CVM_PROGRESS_FILE": "/run/job/.progress"}  # fmt: skip


def test_under_vboxwrapper_the_agent_keeps_the_shared_folder_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """heartbeat touched, progress written where vbox_job.xml's fraction_done_filename
    points, and the exit code on line 1 of the completion trigger file."""
    place = guest_agent.JobPlace(dir=str(tmp_path), shared=str(tmp_path))
    liveness = guest_agent.Liveness(place)
    liveness.beat()
    assert (tmp_path / guest_agent.VBOX_HEARTBEAT).exists()
    Path(place.progress_file).write_text("0.3\n")
    liveness.relay_progress()
    liveness.relay_progress()  # unchanged: said once
    assert (tmp_path / guest_agent.VBOX_PROGRESS).read_text() == "0.3000\n"
    guest_agent.finish_job_place(place, 3)
    assert (tmp_path / guest_agent.VBOX_SHUTDOWN).read_text().splitlines()[0] == "3"
    out = capsys.readouterr().out.splitlines()
    assert [console.parse(line) for line in out] == [console.Heartbeat(), console.Progress(0.3)]
    assert guest_agent.completion_text(1, "no repository") == "1\n0\nno repository\n"


def test_input_files_are_copied_into_the_job_directory(tmp_path: Path) -> None:
    (tmp_path / "input" / "sub").mkdir(parents=True)
    (tmp_path / "input" / "a.txt").write_text("a")
    (tmp_path / "input" / "sub" / "b.txt").write_text("b")
    guest_agent.copy_tree(str(tmp_path / "input"), str(tmp_path / "job"))
    assert (tmp_path / "job" / "a.txt").read_text() == "a"
    assert (tmp_path / "job" / "sub" / "b.txt").read_text() == "b"


# -- QEMU's command line and the disks ---------------------------------------------------


def test_every_writable_disk_is_qcow2_so_that_savevm_works() -> None:
    """savevm refuses a writable raw disk; the read-only config drive may be raw."""
    argv = qemu_argv(512, 2, network=False, machine="pc-i440fx-7.2")
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    for drive in drives:
        assert "format=qcow2" in drive or "readonly=on" in drive, drive
    assert f"file={CONFIG_DRIVE},format=raw,if=virtio,readonly=on" in drives
    assert {"-no-reboot", "-nodefaults"} <= set(argv)
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2"
    assert "-netdev" not in argv
    assert "-netdev" in qemu_argv(512, 1, network=True, machine="pc")


def test_output_files_are_found_by_name_whatever_their_case() -> None:
    listing = "::/Result.TXT\n::/sub/\n::/sub/b.txt\n"
    assert fat_paths(listing) == {"result.txt": "Result.TXT", "sub/b.txt": "sub/b.txt"}


def _fat_file(image: Path, path: str) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    command = ["mtype", "-i", str(image), f"::/{path}"]
    return subprocess.run(command, check=True, capture_output=True, env=env).stdout


def test_a_prepared_slot_has_the_overlay_the_config_drive_and_an_empty_output_disk(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    (tmp_path / "data.bin").write_bytes(b"\x00\x01 input")
    slot = tmp_path / "slot"
    slot.mkdir()
    vm = Vm(slot, base, 512, 1, True, 32)
    vm.prepare("[job]\ncommand = 'true'\n", {"data.bin": tmp_path / "data.bin"})
    overlay = _qemu_img_info(slot / OVERLAY)
    assert overlay["backing-filename"] == str(base) and overlay["format"] == "qcow2"
    assert _fat_file(slot / CONFIG_DRIVE, "user-data") == b"[job]\ncommand = 'true'\n"
    assert _fat_file(slot / CONFIG_DRIVE, "input/data.bin") == b"\x00\x01 input"
    assert guest_agent.fat_label((slot / CONFIG_DRIVE).read_bytes()[:512]) == "CIDATA"
    assert _qemu_img_info(slot / "vm_output.qcow2")["format"] == "qcow2"
    state = (slot / STATE_FILE).read_text()
    assert json.loads(state)["checkpoint"] is None
    vm.prepare("other user data", {})  # a restarted task keeps its slot
    assert (slot / STATE_FILE).read_text() == state
    assert vm.copy_outputs({"out.txt": tmp_path / "out.txt"}) == ["out.txt"]


def test_a_missing_base_image_is_named(tmp_path: Path) -> None:
    vm = Vm(tmp_path, tmp_path / "nope.qcow2", 512, 1, False, 16)
    with pytest.raises(VmError, match=r"nope.qcow2: no such base image"):
        vm.prepare("", {})


# -- QMP against a real QEMU that boots nothing ----------------------------------------


def _qmp_when_ready(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> Qmp:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "QEMU exited"
        try:
            return Qmp(path)
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.05)


def test_qmp_returns_results_and_raises_qemus_own_errors(tmp_path: Path) -> None:
    disk = tmp_path / "scratch.raw"
    disk.write_bytes(bytes(MiB))
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
         "-qmp", f"unix:{sock},server=on,wait=off",
         "-drive", f"file={disk},format=raw,if=virtio"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        with _qmp_when_ready(sock, proc) as qmp:
            assert qmp.execute("query-status")["status"] == "prelaunch"
            with pytest.raises(QmpError, match="no-such-command") as raised:
                qmp.execute("no-such-command")
            assert raised.value.error_class == "CommandNotFound"
            with pytest.raises(QmpError, match="does not support snapshots"):
                qmp.hmp("savevm ckpt")  # HMP reports this only as text
            assert qmp.hmp("info version").strip()  # text, not an error
            os.kill(proc.pid, signal.SIGSTOP)  # a hung QEMU
            try:
                with pytest.raises(QmpError, match="no answer from QEMU within 1 s"):
                    qmp.execute("query-status", timeout=1)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            # the late answer to the timed-out command is not taken for this one's
            assert qmp.execute("query-name") == {}
            qmp.execute("quit")
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the appliance under QEMU -----------------------------------------------------------


class Console:
    """The VM's console as the wrapper reads it: lines and the events they carry."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.lines: list[str] = []

    @property
    def events(self) -> list[console.Event]:
        return [e for e in map(console.parse, self.lines) if e is not None]

    def read(self) -> list[str]:
        new = self.vm.new_console_lines()
        self.lines += new
        return new

    def until(self, wanted: Callable[[str], bool], timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.read():
                if wanted(line):
                    return line
            if self.vm.exited() is not None:
                self.read()
                if any(wanted(line) for line in self.lines[-50:]):
                    return next(line for line in reversed(self.lines) if wanted(line))
                raise AssertionError(f"QEMU exited {self.vm.exited()}:\n" + self.tail())
            assert time.monotonic() < deadline, "timed out; console:\n" + self.tail()
            time.sleep(0.2)

    def until_exited(self, timeout: float = 240) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.vm.exited()) is None:
            assert time.monotonic() < deadline, "QEMU did not exit; console:\n" + self.tail()
            self.read()
            time.sleep(0.2)
        self.read()
        return status

    def tail(self) -> str:
        return "\n".join(self.lines[-30:])


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    """Every VM a test starts is stopped at teardown, whatever happened."""
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.kill()


def _vm(slot: Path, image: Path) -> Vm:
    slot.mkdir(exist_ok=True)
    return Vm(slot, image, memory_mb=512, cpus=1, network=True, output_disk_mb=64)


def _inputs(tmp_path: Path, **files: str) -> dict[str, Path]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp_path / "inputs" / name).write_text(textwrap.dedent(text))
    return {name: tmp_path / "inputs" / name for name in files}


JOB = """\
import hashlib, os, time
progress = os.environ["CVM_PROGRESS_FILE"]
with open(progress, "w") as f:
    f.write("0.5\\n")
time.sleep(6)  # one poll of the agent's progress relay
digest = hashlib.sha256(open("data.bin", "rb").read()).hexdigest()
with open("Result.txt", "w") as f:
    f.write(digest + "\\n")
with open(progress, "a") as f:
    f.write("1.0\\n")
print("job ran in", os.getcwd(), "=", os.environ["CVM_JOB_DIR"])
"""


@pytest.mark.slow
def test_a_job_gets_its_inputs_reports_progress_and_its_outputs_come_back(
    thin_qcow2: Path, served_repository: Served, tmp_path: Path, vms: list[Vm]
) -> None:
    inputs = _inputs(tmp_path, **{"job.py": JOB, "data.bin": "input bytes " * 1000})
    vm = _vm(tmp_path / "slot", thin_qcow2)
    vms.append(vm)
    vm.prepare(served_repository.user_data("python3 job.py"), inputs)
    assert not vm.has_checkpoint
    vm.start()
    watch = Console(vm)
    assert watch.until_exited() == 0
    events = watch.events
    assert console.Heartbeat() in events
    assert console.Mounted("sw.example.org", 1) in events
    assert [e for e in events if isinstance(e, console.Progress)] == [
        console.Progress(0.5), console.Progress(1.0)
    ]  # fmt: skip
    after_job = events[events.index(console.JobExit(0)) :]
    assert console.OutputsWritten() in after_job and console.PoweringOff() in after_job
    assert "job ran in /run/job = /run/job" in watch.lines
    got = tmp_path / "result.txt"
    missing = vm.copy_outputs({"result.txt": got, "never-written.txt": tmp_path / "n"})
    assert missing == ["never-written.txt"]
    assert got.read_text() == hashlib.sha256(b"input bytes " * 1000).hexdigest() + "\n"


TICKS = "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo tick $i $(cut -d' ' -f1 /proc/uptime); sleep 1; done"  # noqa: E501


def _uptime(line: str) -> float:
    return float(line.split()[-1])


@pytest.mark.slow
def test_a_paused_vm_stops_running_and_resumes_where_it_was(
    thin_qcow2: Path, served_repository: Served, tmp_path: Path, vms: list[Vm]
) -> None:
    vm = _vm(tmp_path / "slot", thin_qcow2)
    vms.append(vm)
    vm.prepare(served_repository.user_data(TICKS), {})
    vm.start()
    watch = Console(vm)
    watch.until(lambda line: line.startswith("tick 3 "))
    vm.pause()
    watch.read()
    before = [line for line in watch.lines if line.startswith("tick ")][-1]
    time.sleep(6)  # the window in which a running guest would tick about six times
    assert not watch.read(), "the console moved while the VM was paused"
    vm.resume()
    after = watch.until(lambda line: line.startswith("tick "), timeout=60)
    assert int(after.split()[1]) == int(before.split()[1]) + 1
    # the guest's clock stood still too: its uptime moved by about one sleep, not six
    assert _uptime(after) - _uptime(before) < 3.5, (before, after)
    vm.kill()
    assert vm.exited() is not None


COUNT = """\
import os, sys, time
n = int(sys.argv[1])
for i in range(1, n + 1):
    with open("count.txt", "a") as f:
        f.write(f"{i}\\n")
    with open(os.environ["CVM_PROGRESS_FILE"], "w") as f:
        f.write(f"{i / n}\\n")
    print("count", i, flush=True)
    time.sleep(1)
"""


def _qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         check=True, capture_output=True).stdout  # fmt: skip
    info: dict[str, object] = json.loads(out)
    return info


@pytest.mark.slow
def test_a_job_saved_mid_way_continues_from_its_checkpoint_and_finishes(
    thin_qcow2: Path, served_repository: Served, tmp_path: Path, vms: list[Vm]
) -> None:
    slot = tmp_path / "slot"
    n = 20
    inputs = _inputs(tmp_path, **{"count.py": COUNT})
    user_data = served_repository.user_data(f"python3 count.py {n}")
    first = _vm(slot, thin_qcow2)
    vms.append(first)
    first.prepare(user_data, inputs)
    first.start()
    watch = Console(first)
    watch.until(lambda line: line.startswith("count 3"))
    periodic_s = first.checkpoint()  # a periodic checkpoint: the job goes on counting
    assert first.has_checkpoint and first.exited() is None
    watch.until(lambda line: line.startswith("count 5"))
    saved_s = first.save_and_quit()
    assert first.exited() is not None and first.has_checkpoint
    assert json.loads((slot / STATE_FILE).read_text())["checkpoint"] == "ckpt"
    watch.read()
    counted_before = [line for line in watch.lines if line.startswith("count ")]
    overlay_bytes = (slot / OVERLAY).stat().st_blocks * 512
    snapshots = _qemu_img_info(slot / OVERLAY)["snapshots"]
    vm_state_bytes = snapshots[0]["vm-state-size"]  # type: ignore[index]

    # a new wrapper process: prepare keeps the slot, start restores the saved VM
    state_before = (slot / STATE_FILE).read_text()
    second = _vm(slot, thin_qcow2)
    vms.append(second)
    second.prepare(user_data, inputs)
    assert (slot / STATE_FILE).read_text() == state_before
    started = time.monotonic()
    second.start()
    restore_s = time.monotonic() - started
    after = Console(second)
    assert after.until_exited() == 0
    assert not any("agent started" in line or "job start" in line for line in after.lines)
    counted_after = [line for line in after.lines if line.startswith("count ")]
    assert counted_after[-1] == f"count {n}"
    assert counted_after[0] == f"count {int(counted_before[-1].split()[1]) + 1}"
    assert console.JobExit(0) in after.events and console.OutputsWritten() in after.events
    got = tmp_path / "count.txt"
    assert second.copy_outputs({"count.txt": got}) == []
    assert got.read_text() == "".join(f"{i}\n" for i in range(1, n + 1))
    base_bytes = thin_qcow2.stat().st_blocks * 512
    print(
        f"\ncheckpoint {periodic_s:.2f} s, savevm {saved_s:.2f} s, restore {restore_s:.2f} s,"
        f" VM state {vm_state_bytes / MiB:.1f} MiB, overlay {overlay_bytes / MiB:.1f} MiB"
        f" after the save ({overlay_bytes / base_bytes:.0%} of the {base_bytes / MiB:.1f} MiB base)"
    )


@pytest.mark.slow
def test_a_saved_state_that_does_not_restore_costs_the_checkpoint_not_the_task(
    thin_qcow2: Path, tmp_path: Path, vms: list[Vm]
) -> None:
    """A QEMU upgraded between two runs, or a damaged overlay: -loadvm fails, and the
    wrapper boots the VM afresh rather than failing the task."""
    slot = tmp_path / "slot"
    vm = _vm(slot, thin_qcow2)
    vms.append(vm)
    vm.prepare("", {})
    state = json.loads((slot / STATE_FILE).read_text())
    (slot / STATE_FILE).write_text(json.dumps({**state, "checkpoint": "ckpt"}))  # no such
    assert vm.has_checkpoint
    with pytest.raises(VmError):
        vm.start()
    vm.kill()
    start_vm(vm, restoring=True)
    assert not vm.has_checkpoint and vm.exited() is None
    Console(vm).until(lambda line: "agent started" in line)


PARENT = """\
import sys, time
from pathlib import Path
from cvmbuild.boinc.vm import Vm
vm = Vm(Path(sys.argv[1]), Path(sys.argv[2]), 128, 1, False, 16)
vm.prepare("", {})
vm.start()
print(vm.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_qemu_does_not_outlive_a_killed_wrapper(tmp_path: Path) -> None:
    base = tmp_path / "blank.qcow2"  # nothing to boot: the firmware waits for ever
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    (tmp_path / "slot").mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "slot"), str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    qemu_pid = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, parent.stderr.read() if parent.stderr else ""
        qemu_pid = int(line)
        assert running(qemu_pid)
        parent.kill()  # SIGKILL: the wrapper gets no chance to clean up
        parent.wait()
        wait_gone(qemu_pid, timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if qemu_pid is not None and running(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)


def test_a_missing_slot_directory_is_named_not_blamed_on_the_tool(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"qemu-img: the directory .*/gone does not exist"):
        run(["qemu-img", "--version"], cwd=tmp_path / "gone")
    with pytest.raises(ToolError, match=r"no-such-tool-x not found: install it with"):
        run(["no-such-tool-x"])
