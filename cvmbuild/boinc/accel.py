"""How QEMU runs the appliance's CPU: the accelerator (KVM or TCG software emulation)
and the CPU model, for every place that starts QEMU (`cvmbuild boot`, the BOINC VM).

QEMU's default model, `qemu64`, lacks x86-64-v2 (POPCNT, SSE4.2): modern wheels such as
numpy 2.4 die with SIGILL on it. Under TCG the default here is `max` (every feature TCG
emulates); under KVM `host`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass

QEMU = "qemu-system-x86_64"
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_CPU = {"tcg": "max", "kvm": "host"}
PROBE_TIMEOUT_S = 20
# A boot sector that switches to protected mode and writes 0x21 to QEMU's isa-debug-exit
# port (QEMU exits (0x21 << 1) | 1 = 67). Assembled with GNU as from:
#   cli; xor %ax,%ax; mov %ax,%ds; lgdt gdtr; mov %cr0,%eax; or $1,%al; mov %eax,%cr0
#   ljmp $8,$pm; pm (32-bit): mov $0x10,%ax; mov %ax,%ds; mov %ax,%ss; mov $0x7c00,%esp
#   mov $0x21,%al; out %al,$0xf4; 1: hlt; jmp 1b; gdt: null, code 0x00cf9a..., data ...
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed80f0116487c0f20c00c010f22c0ea177c080066b810008ed88ed0bc007c0000b021e6f4f4ebfd"
    "8d742600900000000000000000ffff0000009acf00ffff00000092cf001700307c0000"
)
_PROBE_EXIT = 67


class AccelError(Exception):
    """The accelerator asked for cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Accel:
    name: str  # kvm or tcg
    cpu: str
    why: str = ""  # how auto chose, for the user

    def args(self) -> list[str]:
        return ["-accel", self.name, "-cpu", self.cpu]


def kvm_unusable(qemu: str = QEMU) -> str | None:
    """Why KVM cannot run a guest here, or None: /dev/kvm must open read-write and a
    probe guest must reach protected mode and exit (nested KVM may open and still fail)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    with tempfile.TemporaryDirectory(prefix="cvm-kvm-probe-") as tmp:
        sector = os.path.join(tmp, "probe.img")
        with open(sector, "wb") as f:
            f.write(_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
        command = [
            qemu, "-accel", "kvm", "-cpu", DEFAULT_CPU["kvm"], "-machine", "pc", "-m", "16",
            "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={sector},format=raw,if=ide",
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"a KVM probe guest did not finish within {PROBE_TIMEOUT_S} s"
        except FileNotFoundError:
            return f"{qemu} not found"
    if result.returncode != _PROBE_EXIT:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        return f"a KVM probe guest failed ({detail[-1] if detail else result.returncode})"
    return None


def choose(accel: str = "auto", cpu: str | None = None, qemu: str = QEMU) -> Accel:
    """The accelerator for `accel` (auto, kvm or tcg) with cpu or its default model."""
    if accel not in ACCELS:
        raise AccelError(f"--accel {accel}: choose one of {', '.join(ACCELS)}")
    if accel == "tcg":
        return Accel("tcg", cpu or DEFAULT_CPU["tcg"])
    reason = kvm_unusable(qemu)
    if accel == "kvm":
        if reason is not None:
            raise AccelError(f"KVM cannot be used: {reason}; use --accel tcg (or auto)")
        return Accel("kvm", cpu or DEFAULT_CPU["kvm"])
    if reason is None:
        return Accel("kvm", cpu or DEFAULT_CPU["kvm"], "KVM works")
    return Accel("tcg", cpu or DEFAULT_CPU["tcg"], f"software emulation: {reason}")


def software(cpu: str | None = None) -> Accel:
    """TCG: what runs everywhere."""
    return choose("tcg", cpu)
