"""vmdk for VMware Workstation/Fusion/ESXi: a monolithic sparse disk on an IDE adapter
(the OVA carries the streamOptimized variant instead)."""

from __future__ import annotations

from pathlib import Path

from cvmbuild.appliance.exporters import ExportContext
from cvmbuild.appliance.exporters.qemu_img import convert


def export(context: ExportContext) -> list[Path]:
    target = context.output / f"{context.name}.vmdk"
    return [convert(context.disk, target, "vmdk", "subformat=monolithicSparse,adapter_type=ide")]
