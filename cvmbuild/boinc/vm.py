"""The appliance VM's lifecycle in a BOINC slot directory, under QEMU (TCG: a checkpoint
restores only under the accelerator that saved it) and QMP.

`prepare` makes the slot's disks: a qcow2 overlay on the shared read-only base image,
the read-only FAT config drive (label CIDATA: `user-data` and the task's files under
`input/`), and the output disk (FAT labelled CVMOUT, in qcow2 so that savevm can
snapshot it). It writes `vm_state.json` with QEMU's exact argv, because a restore needs
the identical device set, and the checkpoint's name once a savevm succeeded. `start`
boots cold or restores that checkpoint (`-loadvm`); `pause`/`resume` are QMP stop and
cont; `checkpoint` and `save_and_quit` run savevm; `copy_outputs` reads files off the
output disk once QEMU has exited. QEMU runs with PR_SET_PDEATHSIG=SIGKILL, so it never
outlives the thread that started it: call `start` from the wrapper's main thread.

Slot files: vm_overlay.qcow2, vm_config.img, vm_output.qcow2, vm_console.log (the serial
console, appended across restarts), vm_qmp.sock, vm_state.json, vm_qemu.log (QEMU's
own stdout and stderr).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from cvmbuild.boinc.accel import software
from cvmbuild.boinc.qmp import Qmp, QmpError
from cvmbuild.boinc.tools import ToolError, dies_with_parent, require, run

OVERLAY = "vm_overlay.qcow2"
CONFIG_DRIVE = "vm_config.img"
OUTPUT_DISK = "vm_output.qcow2"
CONSOLE_LOG = "vm_console.log"
QMP_SOCKET = "vm_qmp.sock"
STATE_FILE = "vm_state.json"
QEMU_LOG = "vm_qemu.log"
CHECKPOINT = "ckpt"
QEMU = "qemu-system-x86_64"
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}  # our images carry no partition table
START_TIMEOUT_S = 120  # QEMU up and its monitor answering, a restore included
COMMAND_TIMEOUT_S = 10
SAVEVM_TIMEOUT_S = 600
QUIT_TIMEOUT_S = 10


class VmError(Exception):
    """The VM could not be prepared, started, controlled or read; the message says why,
    with QEMU's own words where it has some."""


class Vm:
    def __init__(
        self,
        slot: Path,
        base_image: Path,
        memory_mb: int,
        cpus: int,
        network: bool,
        output_disk_mb: int,
    ) -> None:
        self.slot = Path(slot).absolute()
        self.base_image = Path(base_image).absolute()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.network = network
        self.output_disk_mb = output_disk_mb
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._paused = False
        self._console_offset = 0

    # -- the slot's disks ------------------------------------------------------------

    def prepare(self, user_data: str, inputs: dict[str, Path]) -> None:
        """Make the disks and the state file; a slot that has them (a restarted task)
        is kept as it is, its checkpoint included."""
        if self._state_path.exists() and all(
            (self.slot / name).exists() for name in (OVERLAY, CONFIG_DRIVE, OUTPUT_DISK)
        ):
            return
        try:
            require(QEMU, "qemu-img", "mkfs.fat", "mcopy", "mmd")
            for name in (STATE_FILE, OVERLAY, CONFIG_DRIVE, OUTPUT_DISK):
                (self.slot / name).unlink(missing_ok=True)
            base_format = _image_format(self.base_image)
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format,
                 "-b", self.base_image, OVERLAY], cwd=self.slot)  # fmt: skip
            self._make_config_drive(user_data, inputs)
            self._make_output_disk()
            argv = qemu_argv(self.memory_mb, self.cpus, self.network, _machine_type())
        except ToolError as exc:
            raise VmError(f"preparing the VM in {self.slot}: {exc}") from exc
        self._write_state({"argv": argv, "checkpoint": None})

    def _make_config_drive(self, user_data: str, inputs: dict[str, Path]) -> None:
        for name in inputs:
            if "/" in name or name in ("", ".", ".."):
                raise VmError(f"input file name {name!r}: must be a plain file name")
        payload = len(user_data.encode()) + sum(p.stat().st_size for p in inputs.values())
        size_kib = max(2048, math.ceil(payload * 1.1 / 1024) + 1024)
        drive = self.slot / CONFIG_DRIVE
        run(["mkfs.fat", "-C", "-n", "CIDATA", drive, str(size_kib)])
        user_data_file = self.slot / "vm_user_data.tmp"
        user_data_file.write_text(user_data)
        try:
            run(["mcopy", "-i", drive, user_data_file, "::/user-data"], env=MTOOLS_ENV)
        finally:
            user_data_file.unlink()
        if inputs:
            run(["mmd", "-i", drive, "::/input"], env=MTOOLS_ENV)
            for name, path in sorted(inputs.items()):
                run(["mcopy", "-i", drive, path, f"::/input/{name}"], env=MTOOLS_ENV)

    def _make_output_disk(self) -> None:
        raw = self.slot / "vm_output.raw.tmp"  # sparse: only the FAT is written
        try:
            run(["mkfs.fat", "-C", "-n", "CVMOUT", raw, str(self.output_disk_mb * 1024)])
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, OUTPUT_DISK],
                cwd=self.slot)  # fmt: skip
        finally:
            raw.unlink(missing_ok=True)

    @property
    def has_checkpoint(self) -> bool:
        return self._state_path.exists() and self._read_state().get("checkpoint") is not None

    # -- the QEMU process ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Boot cold, or restore the checkpoint; returns once QEMU's monitor answers
        (after the restore, which QEMU does before it serves the monitor)."""
        if self._proc is not None and self._proc.poll() is None:
            raise VmError("the VM is already running")
        if not self._state_path.exists():
            raise VmError(f"{self.slot}: no {STATE_FILE}; prepare the VM first")
        state = self._read_state()
        argv = list(state["argv"])
        if state.get("checkpoint"):
            argv += ["-loadvm", state["checkpoint"]]
        (self.slot / QMP_SOCKET).unlink(missing_ok=True)
        console = self.slot / CONSOLE_LOG
        self._console_offset = console.stat().st_size if console.exists() else 0
        self._paused = False
        with open(self.slot / QEMU_LOG, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    argv,
                    cwd=self.slot,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    preexec_fn=dies_with_parent(),
                    # A terminal's ^C must reach only the wrapper, which saves the VM.
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise VmError(
                    f"{QEMU} not found: install it with `apt-get install qemu-system-x86`"
                ) from exc
        self._qmp = self._connect()

    def _connect(self) -> Qmp:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        # Unix socket paths are limited to 107 bytes and a slot's path may be longer:
        # reach the socket through a descriptor of the slot directory.
        slot_fd = os.open(self.slot, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise VmError(f"QEMU exited {self._proc.returncode}: {self._qemu_log()}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise VmError(f"QEMU's monitor did not answer within {START_TIMEOUT_S} s")
                try:
                    qmp = Qmp(f"/proc/self/fd/{slot_fd}/{QMP_SOCKET}", deadline - time.monotonic())
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.05)
                    continue
                except QmpError as exc:
                    if self._proc.poll() is not None:
                        continue  # reported above, with QEMU's own message
                    raise VmError(f"QEMU's monitor: {exc}") from exc
                qmp.timeout = COMMAND_TIMEOUT_S
                return qmp
        finally:
            os.close(slot_fd)

    def pause(self) -> None:
        self._execute("stop")
        self._paused = True

    def resume(self) -> None:
        self._execute("cont")
        self._paused = False

    def forget_checkpoint(self) -> None:
        """The next start boots cold (a saved state this QEMU cannot restore is no use;
        the next savevm overwrites the old snapshot)."""
        self._write_state({**self._read_state(), "checkpoint": None})

    def checkpoint(self) -> float:
        """savevm while the VM stays up (it is stopped for the save); the seconds taken."""
        seconds = self._savevm()
        if not self._paused:
            self._execute("cont")
        return seconds

    def save_and_quit(self) -> float:
        """savevm, then QEMU quits; the next start restores. The seconds the save took.
        On failure (VmError) the VM runs on, without a checkpoint: kill it."""
        seconds = self._savevm()
        self.kill()
        return seconds

    def _savevm(self) -> float:
        started = time.monotonic()
        self._execute("stop")
        state = self._read_state()
        try:
            self._qmp_or_fail().hmp(f"savevm {CHECKPOINT}", timeout=SAVEVM_TIMEOUT_S)
        except QmpError as exc:
            # savevm drops an older snapshot of that name before it writes the new one
            self._write_state({**state, "checkpoint": None})
            if not self._paused:
                try:
                    self._execute("cont")
                except VmError:
                    pass  # the failed save is the news
            raise VmError(f"saving the VM: {exc}") from exc
        self._write_state({**state, "checkpoint": CHECKPOINT})
        return time.monotonic() - started

    def kill(self) -> None:
        """QMP quit, SIGKILL if QEMU is still there after a deadline; waits for it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._qmp is not None:
                try:
                    self._qmp.execute("quit", timeout=QUIT_TIMEOUT_S)
                except QmpError:
                    pass  # it may close its monitor before it answers
                try:
                    proc.wait(timeout=QUIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._close_qmp()

    def exited(self) -> int | None:
        """QEMU's return code once it exited (the guest powered off: 0)."""
        if self._proc is None or self._proc.poll() is None:
            return None
        self._close_qmp()
        return self._proc.returncode

    def new_console_lines(self) -> list[str]:
        """Whole lines the guest wrote to the serial console since the last call (or
        since start: a restarted VM's log keeps the earlier runs' lines)."""
        try:
            with open(self.slot / CONSOLE_LOG, "rb") as f:
                f.seek(self._console_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._console_offset += end
        text = data[:end].decode("utf-8", "replace")
        return [line.rstrip("\r") for line in text.splitlines()]

    # -- reading the results ---------------------------------------------------------

    def copy_outputs(self, names: dict[str, Path]) -> list[str]:
        """Copy guest files (names relative to the job's directory) to slot paths once
        QEMU has exited; returns the names the job did not leave."""
        if self._proc is not None and self._proc.poll() is None:
            raise VmError("the VM is still running: its output disk cannot be read yet")
        raw = self.slot / "vm_output.raw.tmp"
        try:
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", OUTPUT_DISK, raw.name],
                cwd=self.slot)  # fmt: skip
            # a recursive listing of an empty disk is an error, a flat one is not
            listing = run(["mdir", "-b", "-i", raw, "::"], env=MTOOLS_ENV)
            if listing.strip():
                listing = run(["mdir", "-/", "-b", "-i", raw, "::"], env=MTOOLS_ENV)
            on_disk = fat_paths(listing.decode("utf-8", "replace"))
            missing = []
            for name, dest in names.items():
                found = on_disk.get(name.strip("/").lower())
                if found is None:
                    missing.append(name)
                    continue
                run(["mcopy", "-n", "-i", raw, f"::/{found}", dest], env=MTOOLS_ENV)
            return missing
        except ToolError as exc:
            raise VmError(f"reading the output disk: {exc}") from exc
        finally:
            raw.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.slot / STATE_FILE

    def _read_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self._state_path.read_text())
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self._state_path)

    def _qmp_or_fail(self) -> Qmp:
        if self._qmp is None or self._proc is None or self._proc.poll() is not None:
            raise VmError("the VM is not running")
        return self._qmp

    def _execute(self, command: str) -> Any:
        try:
            return self._qmp_or_fail().execute(command)
        except QmpError as exc:
            raise VmError(str(exc)) from exc

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def _qemu_log(self) -> str:
        try:
            text = (self.slot / QEMU_LOG).read_text(errors="replace").strip()
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-10:]) or "(no output)"


def qemu_argv(memory_mb: int, cpus: int, network: bool, machine: str) -> list[str]:
    """QEMU's command line, relative to the slot directory (its working directory)."""
    argv = [
        QEMU, "-machine", machine, *software().args(),
        "-m", str(memory_mb), "-smp", str(cpus),
        "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
        "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
        "-chardev", f"file,id=con,path={CONSOLE_LOG},append=on", "-serial", "chardev:con",
        "-drive", f"file={OVERLAY},format=qcow2,if=virtio",
        "-drive", f"file={CONFIG_DRIVE},format=raw,if=virtio,readonly=on",
        "-drive", f"file={OUTPUT_DISK},format=qcow2,if=virtio",
    ]  # fmt: skip
    if network:
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    return argv


def fat_paths(mdir_listing: str) -> dict[str, str]:
    """Files in `mdir -/ -b` output, by lower-case path (FAT ignores case)."""
    paths = {}
    for line in mdir_listing.splitlines():
        path = line.strip().removeprefix("::/")
        if path and not path.endswith("/"):
            paths[path.lower()] = path
    return paths


def _image_format(image: Path) -> str:
    if not image.is_file():
        raise VmError(f"{image}: no such base image")
    info = json.loads(run(["qemu-img", "info", "--output=json", image]))
    return str(info["format"])


def _machine_type() -> str:
    """The versioned name behind QEMU's `pc` alias: a checkpoint restores only on the
    machine version that saved it, even if QEMU is upgraded in between."""
    listing = run([QEMU, "-machine", "help"]).decode()
    m = re.search(r"^pc\s.*\(alias of (\S+)\)", listing, re.MULTILINE)
    return m.group(1) if m else "pc"
