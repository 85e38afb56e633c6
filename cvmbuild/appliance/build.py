"""From a recipe to a bootable raw disk: rootfs, squashfs, kernel and initramfs, disk.

Each stage reports on stderr as it starts and ends, with its time.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cvmbuild.appliance import disk, kmod, rootfs
from cvmbuild.appliance.initramfs import build_initramfs
from cvmbuild.appliance.process import require
from cvmbuild.appliance.recipe import Recipe
from cvmfs_client.console import human


class Stages:
    """`[2/5] squashfs root ... 12.3 s, 41.2 MiB` lines, one per stage."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.number = 0
        self.stream = stream or sys.stderr
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        self.number += 1
        note: dict[str, str] = {}
        prefix = f"[{self.number}/{self.total}] {name}"
        print(f"{prefix} ...", file=self.stream, flush=True)
        started = time.monotonic()
        yield note
        elapsed = time.monotonic() - started
        self.times[name] = elapsed
        detail = f", {note['detail']}" if "detail" in note else ""
        print(f"{prefix}: done in {elapsed:.1f} s{detail}", file=self.stream, flush=True)


BUILD_STAGES = 5


@dataclass(frozen=True)
class BuiltDisk:
    raw: Path
    record: str  # JSON: recipe, rootfs content hash, package versions
    content_hash: str


def build_disk(recipe: Recipe, workdir: Path, stages: Stages) -> BuiltDisk:
    require("mmdebstrap", "mksquashfs", "mkfs.fat", "mcopy", "syslinux", "dpkg-deb", "chroot")
    cache = rootfs.cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    epoch = recipe.base.source_date_epoch

    with stages.stage(f"rootfs: mmdebstrap {recipe.base.suite} minbase") as note:
        tree = rootfs.bootstrap(recipe, workdir / "rootfs", cache)
        note["detail"] = f"{len(tree.packages)} packages"
    with stages.stage("appliance files, trim, content hash") as note:
        ours = rootfs.install_appliance_files(tree, recipe)
        freed = rootfs.trim(tree.tree, recipe.base.remove)
        digest = rootfs.content_hash(rootfs.walk(tree.tree))
        record = rootfs.record(tree, ours, digest, recipe)
        note["detail"] = f"{human(freed)} trimmed, content sha256 {digest[:16]}"
    squashfs = workdir / "root.squashfs"
    with stages.stage(f"squashfs root ({recipe.base.compression})") as note:
        rootfs.make_squashfs(tree.tree, squashfs, recipe)
        note["detail"] = human(squashfs.stat().st_size)
    (kernel_name, kernel_version), (busybox_name, busybox_version) = tree.boot_packages
    with stages.stage(f"kernel {kernel_name} and initramfs") as note:
        kernel_root = rootfs.unpacked(cache, kernel_name, kernel_version)
        (modules_dir,) = (kernel_root / "lib/modules").iterdir()
        selection = kmod.ModuleTree(modules_dir).select(recipe.kernel.modules, kernel_name)
        busybox = rootfs.unpacked(cache, busybox_name, busybox_version) / "bin/busybox"
        initrd = workdir / "initrd.img"
        initrd.write_bytes(build_initramfs(busybox.read_bytes(), modules_dir, selection, epoch))
        vmlinuz = kernel_root / "boot" / f"vmlinuz-{modules_dir.name}"
        note["detail"] = (
            f"{len(selection.load_order)} modules, initramfs {human(initrd.stat().st_size)}"
        )
    with stages.stage("disk image (MBR, SYSLINUX, FAT boot, squashfs root)") as note:
        record_file = workdir / "cvmappliance.json"
        record_file.write_text(record + "\n")
        boot = workdir / "boot.fat"
        ids = hashlib.sha256(digest.encode() + recipe.text.encode()).digest()
        disk.make_boot_partition(
            boot,
            {"vmlinuz": vmlinuz, "initrd.img": initrd, "cvmappliance.json": record_file},
            recipe.kernel.command_line,
            volume_id=int.from_bytes(ids[:4], "little"),
            epoch=epoch,
            uefi=recipe.appliance.uefi,
        )
        boot_type = disk.TYPE_EFI_SYSTEM if recipe.appliance.uefi else disk.TYPE_FAT16_LBA
        partitions, size = disk.layout(
            [
                (boot.stat().st_size, boot_type, True),
                (squashfs.stat().st_size, disk.TYPE_LINUX, False),
            ]
        )
        mbr = disk.master_boot_record(
            disk.MBR_CODE.read_bytes(), int.from_bytes(ids[4:8], "little"), partitions
        )
        raw = workdir / "disk.raw"
        disk.assemble(raw, mbr, list(zip(partitions, [boot, squashfs], strict=True)), size)
        note["detail"] = f"{human(size)} raw"
    return BuiltDisk(raw, record, digest)
