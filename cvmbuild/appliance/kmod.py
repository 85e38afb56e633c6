"""Which kernel modules the initramfs carries and in which order it loads them.

Dependencies come from each module's own .modinfo ELF section (`depends=`), so no
depmod run is needed on the unpacked kernel package.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cvmbuild.appliance.errors import ApplianceError


def normalize(name: str) -> str:
    """Module names treat '-' and '_' alike (xen-blkfront is xen_blkfront)."""
    base = os.path.basename(name)
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ApplianceError("not a little-endian ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + index * shentsize
        )
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name, offset, size = section(index)
        end = elf.index(b"\0", names_offset + name)
        if elf[names_offset + name : end] != b".modinfo":
            continue
        for item in elf[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class ModuleSelection:
    load_order: list[str]  # paths relative to lib/modules/VERSION, dependencies first
    builtin: list[str]  # wanted names that are built into the kernel


class ModuleTree:
    """An unpacked /lib/modules/VERSION directory."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, str] = {}
        for directory, _dirs, files in os.walk(root / "kernel"):
            for file in files:
                if ".ko" in file:
                    rel = os.path.relpath(os.path.join(directory, file), root)
                    self.paths[normalize(file)] = rel
        try:
            lines = (root / "modules.builtin").read_text().split()
        except FileNotFoundError:
            lines = []
        self.builtin = {normalize(line) for line in lines}

    def depends(self, name: str) -> list[str]:
        info = modinfo((self.root / self.paths[name]).read_bytes())
        deps = [normalize(d) for value in info.get("depends", []) for d in value.split(",") if d]
        # soft pre-dependencies (e.g. a crc implementation) are needed at load time too
        for value in info.get("softdep", []):
            section = ""
            for word in value.split():
                if word.endswith(":"):
                    section = word
                elif section == "pre:":
                    deps.append(normalize(word))
        return deps

    def select(self, wanted: Iterable[str], kernel: str) -> ModuleSelection:
        order: list[str] = []
        done: set[str] = set()
        builtin: list[str] = []
        missing: list[str] = []

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in done or name in self.builtin:
                return
            if name in chain:
                raise ApplianceError(f"{kernel}: module dependency cycle {' -> '.join(chain)}")
            if name not in self.paths:
                if not chain:
                    missing.append(name)
                return  # an optional soft dependency the kernel does not have
            for dep in self.depends(name):
                visit(dep, (*chain, name))
            done.add(name)
            order.append(self.paths[name])

        for raw in wanted:
            name = normalize(raw)
            if name in self.builtin:
                builtin.append(name)
            else:
                visit(name, ())
        if missing:
            raise ApplianceError(
                f"{kernel} has neither a module nor a built-in driver for "
                f"{', '.join(missing)}; choose another [kernel] package or drop them from "
                "[kernel] modules"
            )
        return ModuleSelection(order, builtin)
