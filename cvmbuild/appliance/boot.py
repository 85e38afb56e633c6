"""`cvmbuild boot`: start an image under QEMU (KVM when it works, else software
emulation with a modern CPU model), give it user data on a config drive (or the user's
own cloud-init seed), and read its serial console until the appliance reports its
repository mounted and its job's result; or, with --shell, hand the console to the user.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

from cvmbuild.appliance.boot_disks import check_disk, disk_of, make_cache_disk, make_config_drive
from cvmbuild.appliance.errors import BootError
from cvmbuild.appliance.process import require
from cvmbuild.boinc import accel as accel_mod
from cvmbuild.boinc import console
from cvmbuild.boinc.tools import dies_with_parent

MARK = console.MARK
OVMF = Path("/usr/share/ovmf/OVMF.fd")  # package ovmf
# Disk bus and NIC per hardware profile: QEMU/KVM, VirtualBox (SATA), VMware (IDE).
HARDWARE = {
    "virtio": ("virtio", "virtio-net-pci"),
    "sata": ("sata", "e1000"),
    "ide": ("ide", "e1000"),
}


@dataclass(frozen=True)
class BootOptions:
    image: Path
    repo_url: str | None = None
    repo_key: Path | None = None
    proxy: str | None = None
    job: str | None = None
    repo_name: str | None = None
    timeout: float = 300
    memory_mb: int = 512
    hardware: str = "virtio"
    firmware: str = "bios"  # or "uefi" (OVMF)
    console_log: Path | None = None
    echo: TextIO | None = None  # every console line goes here too (--verbose)
    accel: str = "auto"  # auto | kvm | tcg
    cpu: str | None = None  # QEMU's -cpu model (default: accel.DEFAULT_CPU)
    cpus: int = 1
    forwards: tuple[str, ...] = ()  # HOST_PORT:GUEST_PORT, TCP
    seed: Path | None = None  # a NoCloud (cidata) or ConfigDrive (config-2) image
    cache_disk: Path | None = None  # made empty if missing; the guest formats it
    cache_size: str = "2G"
    shell: bool = False  # the serial console on our terminal; a shell after the job


@dataclass
class BootResult:
    repositories: list[tuple[str, int]] = field(default_factory=list)  # (name, revision)
    job_exit: int | None = None
    job_output: list[str] = field(default_factory=list)
    error: str | None = None
    no_job: bool = False
    in_job: bool = False
    seconds_to_mount: float | None = None
    seconds_to_result: float | None = None
    console: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.error is not None or self.job_exit is not None or self.no_job


def user_data(
    repo_url: str | None,
    repo_key: str | None,
    proxy: str | None,
    job: str | None,
    *,
    name: str | None = None,
    then: str | None = None,
) -> str:
    """The TOML the guest agent reads from the config drive (JSON strings are valid
    TOML basic strings)."""
    repository = {"url": repo_url, "public_key": repo_key, "proxy": proxy, "name": name}
    lines = []
    if any(repository.values()):
        lines.append("[repository]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in repository.items() if v]
    job_table = {"command": job, "then": then}
    if any(job_table.values()):
        lines.append("[job]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in job_table.items() if v]
    return "\n".join(lines) + "\n"


def feed(result: BootResult, line: str, elapsed: float) -> None:
    """Update result with one console line (pure: the markers the agent prints)."""
    result.console.append(line)
    event = console.parse(line)
    if event is None:
        if result.in_job:
            result.job_output.append(line)
        return
    match event:
        case console.Mounted(name, revision):
            result.repositories.append((name, revision))
            result.seconds_to_mount = elapsed
        case console.JobExit(status):
            result.job_exit = status
            result.in_job = False
            result.seconds_to_result = elapsed
        case console.JobStart():
            result.job_output = []
            result.in_job = True
        case console.Error(text):
            result.error = text
            result.seconds_to_result = elapsed
        case console.NoJob():
            result.no_job = True
            result.seconds_to_result = elapsed


def parse_forward(text: str) -> tuple[int, int]:
    """`--forward HOST:GUEST`: TCP ports, host side on the loopback."""
    host, sep, guest = text.partition(":")
    try:
        ports = (int(host), int(guest))
    except ValueError:
        ports = (0, 0)
    if not sep or not all(0 < p < 65536 for p in ports):
        raise BootError(f"--forward {text!r}: write HOST_PORT:GUEST_PORT, e.g. 8080:80")
    return ports


def qemu_command(
    image: Path,
    fmt: str,
    config_drive: Path | None,
    memory_mb: int,
    hardware: str,
    firmware: str = "bios",
    *,
    accel: accel_mod.Accel | None = None,
    cpus: int = 1,
    forwards: tuple[str, ...] = (),
    cache_disk: Path | None = None,
    interactive: bool = False,
) -> list[str]:
    bus, nic = HARDWARE[hardware]
    disk = f"file={image},format={fmt},snapshot=on"
    netdev = "user,id=net0" + "".join(
        ",hostfwd=tcp:127.0.0.1:{}-:{}".format(*parse_forward(f)) for f in forwards
    )
    # mon:stdio: the console on the user's terminal, Ctrl-a x quits, Ctrl-c reaches the guest
    serial = ["-serial", "mon:stdio"] if interactive else ["-serial", "stdio", "-monitor", "none"]
    command = [
        "qemu-system-x86_64", "-machine", "pc" if bus != "sata" else "q35",
        *(accel or accel_mod.software()).args(),
        "-m", str(memory_mb), "-smp", str(cpus), "-display", "none", "-nodefaults",
        *serial, "-no-reboot",
        "-netdev", netdev, "-device", f"{nic},netdev=net0",
    ]  # fmt: skip
    if bus == "virtio":
        command += ["-drive", f"{disk},if=virtio"]
    elif bus == "ide":
        command += ["-drive", f"{disk},if=ide,index=0,media=disk"]
    else:  # q35's built-in AHCI controller, as VirtualBox's SATA
        command += ["-drive", f"{disk},if=none,id=root", "-device", "ide-hd,drive=root,bus=ide.0"]
    if config_drive is not None:
        command += ["-drive", f"file={config_drive},format=raw,if=virtio,readonly=on"]
    if cache_disk is not None:
        command += ["-drive", f"file={cache_disk},format=qcow2,if=virtio"]
    if firmware == "uefi":
        command += ["-bios", str(OVMF)]
    return command


def boot(options: BootOptions) -> BootResult:
    """Boot and watch; with options.shell, the console is the user's and the result
    holds only QEMU's exit status (as job_exit)."""
    require("qemu-system-x86_64", "qemu-img", "mkfs.fat", "mcopy")
    if options.hardware not in HARDWARE:
        raise BootError(f"--hardware {options.hardware}: choose {', '.join(HARDWARE)}")
    if options.firmware == "uefi" and not OVMF.exists():
        raise BootError(f"{OVMF} is missing: `apt-get install ovmf` to boot with UEFI")
    for forward in options.forwards:
        parse_forward(forward)
    given = [options.repo_url, options.repo_key, options.proxy, options.job, options.repo_name]
    if options.seed is not None:
        if any(given):
            raise BootError("--seed carries the user data: leave out --repo-*, --proxy, --job")
        if not options.seed.is_file():
            raise BootError(f"{options.seed}: no such seed image")
    with tempfile.TemporaryDirectory(prefix="cvmbuild-boot-") as tmp:
        scratch = Path(tmp)
        disk, fmt = disk_of(options.image, scratch)
        check_disk(disk, fmt, options.image)
        drive = options.seed
        if drive is None:
            key = options.repo_key.read_text() if options.repo_key else None
            then = "shell" if options.shell else None
            text = user_data(options.repo_url, key, options.proxy, options.job,
                             name=options.repo_name, then=then)  # fmt: skip
            if text.strip():
                drive = scratch / "cidata.img"
                make_config_drive(drive, text)
        if options.cache_disk is not None:
            make_cache_disk(options.cache_disk, options.cache_size)
        try:
            chosen = accel_mod.choose(options.accel, options.cpu)
        except accel_mod.AccelError as exc:
            raise BootError(str(exc)) from None

        def command(accel: accel_mod.Accel) -> list[str]:
            return qemu_command(
                disk, fmt, drive, options.memory_mb, options.hardware, options.firmware,
                accel=accel, cpus=options.cpus, forwards=options.forwards,
                cache_disk=options.cache_disk, interactive=options.shell,
            )  # fmt: skip

        watch = _attach if options.shell else partial(_watch, options=options)
        try:
            return watch(command(chosen))
        except _KvmFailed as exc:
            if options.accel != "auto":
                raise BootError(f"KVM failed ({exc}): use --accel tcg") from None
            fallback = accel_mod.software(options.cpu)
            print(f"cvmbuild boot: KVM failed ({exc}); booting again under software emulation "
                  f"(-cpu {fallback.cpu})", file=sys.stderr, flush=True)  # fmt: skip
            return watch(command(fallback))


class _KvmFailed(Exception):
    """QEMU stopped under KVM before the appliance said a word."""


_KVM_FAILURES = ("KVM internal error", "kvm_", "KVM: ")


def _attach(command: list[str]) -> BootResult:
    """--shell: QEMU on the user's terminal; its exit status as the result. QEMU's
    stderr is watched for a KVM failure (which leaves QEMU hanging, not exiting)."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, preexec_fn=dies_with_parent())
    failed: list[str] = []

    def error_reader() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            line = raw.decode("utf-8", "replace").strip()
            if "kvm" in command and any(m in line for m in _KVM_FAILURES):
                failed.append(line)
                proc.terminate()  # SIGTERM: QEMU gives the terminal its settings back

    reader = threading.Thread(target=error_reader, daemon=True)
    reader.start()
    try:
        status = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    if failed:
        raise _KvmFailed(failed[0])
    return BootResult(job_exit=status)


def _watch(command: list[str], options: BootOptions) -> BootResult:
    result = BootResult()
    log = open(options.console_log, "w") if options.console_log else None  # noqa: SIM115
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []  # QEMU's stderr
    started = time.monotonic()
    under_kvm = "kvm" in command
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=dies_with_parent(),  # a killed `cvmbuild boot` leaves no QEMU behind
    )

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        lines.put(None)

    def error_reader() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            errors.append(raw.decode("utf-8", "replace").strip())

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=error_reader, daemon=True).start()
    spoke = False
    try:
        deadline = started + options.timeout
        while not result.finished:
            if under_kvm and not spoke:
                failed = [e for e in errors if any(m in e for m in _KVM_FAILURES)]
                if failed or proc.poll() not in (None, 0):
                    raise _KvmFailed(failed[0] if failed else f"QEMU exited {proc.returncode}")
            wait = max(0.1, deadline - time.monotonic())
            if under_kvm and not spoke:
                wait = min(wait, 1.0)  # a KVM failure leaves QEMU hanging, not exiting
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise BootError(
                        f"no result within {options.timeout:.0f} s; last console lines:\n"
                        + _tail(result)
                    ) from None
                continue
            if line is None:
                proc.wait()
                stderr = "; ".join(e for e in errors if e)
                if under_kvm and not spoke:
                    raise _KvmFailed(stderr or f"QEMU exited {proc.returncode}")
                raise BootError(
                    f"QEMU exited {proc.returncode} before the appliance reported a result"
                    + (f": {stderr}" if stderr else "")
                    + "; last console lines:\n"
                    + _tail(result)
                )
            spoke = spoke or MARK in line
            if log:
                log.write(line + "\n")
            if options.echo:
                print(line, file=options.echo, flush=True)
            elif MARK in line:
                print(line[line.find(MARK) :], file=sys.stderr, flush=True)
            feed(result, line, time.monotonic() - started)
        # let the appliance power off by itself, and capture its last lines
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if log:
            log.close()
    if result.error is not None:
        raise BootError(f"the appliance reported: {result.error}")
    if not result.repositories and result.job_exit is not None:
        raise BootError("the job ran but no repository was mounted")
    return result


def _tail(result: BootResult, n: int = 15) -> str:
    return "\n".join(result.console[-n:])
