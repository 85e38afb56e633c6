"""The partitioned raw disk, built without loop devices or mounts.

Partition 1 is a small FAT file system made with mkfs.fat and filled with mtools:
SYSLINUX (installed by its mtools-based installer), the kernel, the initramfs and the
build record. Partition 2 is the squashfs root, copied in as it is. The MBR (SYSLINUX's
boot code and our partition table) is written by `master_boot_record`.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from cvmbuild.appliance.errors import ApplianceError
from cvmbuild.appliance.process import run

SECTOR = 512
MiB = 1024 * 1024
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
EFI_LOADER = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")  # syslinux-efi
EFI_LDLINUX = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")  # syslinux-common
TYPE_FAT16_LBA = 0x0E
TYPE_EFI_SYSTEM = 0xEF  # UEFI firmware looks for this; SYSLINUX's MBR code ignores types
TYPE_LINUX = 0x83


@dataclass(frozen=True)
class Partition:
    start: int  # bytes, a multiple of 1 MiB
    size: int  # bytes, a multiple of 1 MiB
    type_id: int
    bootable: bool = False


def round_up(n: int, unit: int = MiB) -> int:
    return -(-n // unit) * unit


def layout(sizes: list[tuple[int, int, bool]]) -> tuple[list[Partition], int]:
    """Partitions of (size, type, bootable), each 1 MiB aligned after a 1 MiB gap for
    the MBR; returns them and the disk size (a whole number of MiB, as Azure wants)."""
    partitions = []
    offset = MiB
    for size, type_id, bootable in sizes:
        size = round_up(size)
        partitions.append(Partition(offset, size, type_id, bootable))
        offset += size
    return partitions, offset


def master_boot_record(boot_code: bytes, disk_id: int, partitions: list[Partition]) -> bytes:
    """512 bytes: boot code (up to 440 bytes), disk signature, four partition entries
    (LBA only: the CHS fields say 'use LBA') and the 0x55AA signature."""
    if len(boot_code) > 440:
        raise ApplianceError(f"MBR boot code is {len(boot_code)} bytes, at most 440 fit")
    if len(partitions) > 4:
        raise ApplianceError("an MBR holds at most four primary partitions")
    table = b""
    for p in partitions:
        chs = b"\xfe\xff\xff"
        table += struct.pack(
            "<B3sB3sII",
            0x80 if p.bootable else 0,
            chs,
            p.type_id,
            chs,
            p.start // SECTOR,
            p.size // SECTOR,
        )
    table = table.ljust(64, b"\0")
    return boot_code.ljust(440, b"\0") + struct.pack("<IH", disk_id, 0) + table + b"\x55\xaa"


def syslinux_config(command_line: str) -> str:
    return (
        "SERIAL 0 115200\n"
        "DEFAULT appliance\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL appliance\n"
        "  LINUX /vmlinuz\n"
        "  INITRD /initrd.img\n"
        f"  APPEND {command_line}\n"
    )


def make_boot_partition(
    out: Path,
    files: dict[str, Path],
    command_line: str,
    volume_id: int,
    epoch: int,
    uefi: bool = False,
) -> None:
    """A FAT image with SYSLINUX installed for BIOS (and, with uefi, its EFI build as
    the removable-media loader \\EFI\\BOOT\\BOOTX64.EFI), files copied in by name;
    nothing is mounted."""
    payload = sum(p.stat().st_size for p in files.values())
    size = round_up(payload + payload // 10 + 2 * MiB)
    out.unlink(missing_ok=True)
    run(["mkfs.fat", "-C", "-n", "CVMBOOT", "-i", f"{volume_id:08x}", "--invariant",
         out, str(size // 1024)])  # fmt: skip
    env = {"SOURCE_DATE_EPOCH": str(epoch), "MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", out, "::/syslinux"], env=env)
    run(["syslinux", "--install", "--directory", "/syslinux", out])
    config = out.with_name("syslinux.cfg")
    config.write_text(syslinux_config(command_line))
    for path in (config, *files.values()):
        os.utime(path, (epoch, epoch))
    run(["mcopy", "-m", "-i", out, config, "::/syslinux/syslinux.cfg"], env=env)
    for name, path in files.items():
        run(["mcopy", "-m", "-i", out, path, f"::/{name}"], env=env)
    if uefi:
        for loader in (EFI_LOADER, EFI_LDLINUX):
            if not loader.exists():
                raise ApplianceError(
                    f"{loader} is missing: `apt-get install syslinux-efi syslinux-common` "
                    "(or set [appliance] uefi = false)"
                )
        run(["mmd", "-i", out, "::/EFI", "::/EFI/BOOT"], env=env)
        for source, name in ((EFI_LOADER, "BOOTX64.EFI"), (EFI_LDLINUX, "ldlinux.e64"),
                             (config, "syslinux.cfg")):  # fmt: skip
            run(["mcopy", "-i", out, source, f"::/EFI/BOOT/{name}"], env=env)


def assemble(out: Path, mbr: bytes, contents: list[tuple[Partition, Path]], size: int) -> None:
    """Write the MBR and each partition's image at its offset; the rest stays sparse."""
    with open(out, "wb") as disk:
        disk.truncate(size)
        disk.write(mbr)
        for partition, image in contents:
            if image.stat().st_size > partition.size:
                raise ApplianceError(f"{image} does not fit its {partition.size} byte partition")
            disk.seek(partition.start)
            with open(image, "rb") as src:
                shutil.copyfileobj(src, disk, 4 * MiB)
