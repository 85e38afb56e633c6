"""`cvmbuild boot`: start an image under QEMU (software emulation, no KVM), give it user
data on a config drive, and read its serial console until the appliance reports its
repository mounted and its job's result.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cvmbuild.appliance.errors import BootError
from cvmbuild.appliance.exporters import qemu_img
from cvmbuild.appliance.exporters.hdd import image_file_name
from cvmbuild.appliance.process import require, run
from cvmbuild.boinc import console

MARK = console.MARK
OVMF = Path("/usr/share/ovmf/OVMF.fd")  # package ovmf
# Disk bus and NIC per hardware profile: QEMU/KVM, VirtualBox (SATA), VMware (IDE).
HARDWARE = {
    "virtio": ("virtio", "virtio-net-pci"),
    "sata": ("sata", "e1000"),
    "ide": ("ide", "e1000"),
}


# A fixed VHD has its only header at the end, so qemu-img's probing takes it for raw.
BY_SUFFIX = {".raw": "raw", ".img": "raw", ".qcow2": "qcow2", ".vdi": "vdi", ".vmdk": "vmdk",
             ".vhd": "vpc"}  # fmt: skip


@dataclass(frozen=True)
class BootOptions:
    image: Path
    repo_url: str | None = None
    repo_key: Path | None = None
    proxy: str | None = None
    job: str | None = None
    timeout: float = 300
    memory_mb: int = 512
    hardware: str = "virtio"
    firmware: str = "bios"  # or "uefi" (OVMF)
    console_log: Path | None = None
    echo: TextIO | None = None  # every console line goes here too (--verbose)


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
    repo_url: str | None, repo_key: str | None, proxy: str | None, job: str | None
) -> str:
    """The TOML the guest agent reads from the config drive (JSON strings are valid
    TOML basic strings)."""
    repository = {"url": repo_url, "public_key": repo_key, "proxy": proxy}
    lines = []
    if any(repository.values()):
        lines.append("[repository]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in repository.items() if v]
    if job:
        lines += ["[job]", f"command = {json.dumps(job, ensure_ascii=False)}"]
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


def qemu_command(
    image: Path,
    fmt: str,
    config_drive: Path | None,
    memory_mb: int,
    hardware: str,
    firmware: str = "bios",
) -> list[str]:
    bus, nic = HARDWARE[hardware]
    disk = f"file={image},format={fmt},snapshot=on"
    command = [
        "qemu-system-x86_64", "-machine", "pc" if bus != "sata" else "q35", "-accel", "tcg",
        "-m", str(memory_mb), "-smp", "1", "-display", "none", "-nodefaults",
        "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-netdev", "user,id=net0", "-device", f"{nic},netdev=net0",
    ]  # fmt: skip
    if bus == "virtio":
        command += ["-drive", f"{disk},if=virtio"]
    elif bus == "ide":
        command += ["-drive", f"{disk},if=ide,index=0,media=disk"]
    else:  # q35's built-in AHCI controller, as VirtualBox's SATA
        command += ["-drive", f"{disk},if=none,id=root", "-device", "ide-hd,drive=root,bus=ide.0"]
    if config_drive is not None:
        command += ["-drive", f"file={config_drive},format=raw,if=virtio,readonly=on"]
    if firmware == "uefi":
        command += ["-bios", str(OVMF)]
    return command


def make_config_drive(path: Path, text: str) -> None:
    """A small FAT disk labelled CIDATA with a user-data file (NoCloud style)."""
    path.unlink(missing_ok=True)
    run(["mkfs.fat", "-C", "-n", "CIDATA", path, "2048"])
    source = path.with_name("user-data")
    source.write_text(text)
    run(["mcopy", "-i", path, source, "::/user-data"], env={"MTOOLS_SKIP_CHECK": "1"})


def disk_of(image: Path, scratch: Path) -> tuple[Path, str]:
    """The disk QEMU opens for an image file, OVA or Parallels bundle, with its format."""
    if image.is_dir():
        hds = image / image_file_name(image.name.removesuffix(".hdd"))
        found = [hds] if hds.exists() else sorted(image.glob("*.hds"))
        if not found:
            raise BootError(f"{image}: no .hds image in this Parallels bundle")
        return found[0], "parallels"
    if image.suffix == ".ova":
        with tarfile.open(image) as tar:
            disks = [m for m in tar.getmembers() if m.name.endswith(".vmdk")]
            if not disks:
                raise BootError(f"{image}: no vmdk disk inside the OVA")
            tar.extract(disks[0], scratch, filter="data")
        return scratch / disks[0].name, "vmdk"
    if not image.exists():
        raise BootError(f"{image}: no such image")
    if image.suffix in BY_SUFFIX:
        return image, BY_SUFFIX[image.suffix]
    return image, str(qemu_img.info(image)["format"])


def boot(options: BootOptions) -> BootResult:
    require("qemu-system-x86_64", "qemu-img", "mkfs.fat", "mcopy")
    if options.hardware not in HARDWARE:
        raise BootError(f"--hardware {options.hardware}: choose {', '.join(HARDWARE)}")
    if options.firmware == "uefi" and not OVMF.exists():
        raise BootError(f"{OVMF} is missing: `apt-get install ovmf` to boot with UEFI")
    with tempfile.TemporaryDirectory(prefix="cvmbuild-boot-") as tmp:
        scratch = Path(tmp)
        disk, fmt = disk_of(options.image, scratch)
        key = options.repo_key.read_text() if options.repo_key else None
        text = user_data(options.repo_url, key, options.proxy, options.job)
        drive = None
        if text.strip():
            drive = scratch / "cidata.img"
            make_config_drive(drive, text)
        command = qemu_command(
            disk, fmt, drive, options.memory_mb, options.hardware, options.firmware
        )
        return _watch(command, options)


def _watch(command: list[str], options: BootOptions) -> BootResult:
    result = BootResult()
    log = open(options.console_log, "w") if options.console_log else None  # noqa: SIM115
    lines: queue.Queue[str | None] = queue.Queue()
    started = time.monotonic()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    try:
        deadline = started + options.timeout
        while not result.finished:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
                if time.monotonic() >= deadline:
                    raise BootError(
                        f"no result within {options.timeout:.0f} s; last console lines:\n"
                        + _tail(result)
                    ) from None
            if line is None:
                proc.wait()
                stderr = (proc.stderr.read() if proc.stderr else b"").decode().strip()
                raise BootError(
                    f"QEMU exited {proc.returncode} before the appliance reported a result"
                    + (f": {stderr}" if stderr else "")
                    + "; last console lines:\n"
                    + _tail(result)
                )
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
