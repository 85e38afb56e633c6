"""qcow2 for QEMU/KVM, libvirt and OpenStack: compressed clusters (zlib, which every
QEMU reads)."""

from __future__ import annotations

from pathlib import Path

from cvmbuild.appliance.exporters import ExportContext
from cvmbuild.appliance.exporters.qemu_img import convert


def export(context: ExportContext) -> list[Path]:
    target = context.output / f"{context.name}.qcow2"
    return [convert(context.disk, target, "qcow2", "compat=1.1", compress=True)]
