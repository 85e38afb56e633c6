"""vhd for Hyper-V and Azure: fixed size (Azure accepts no other), the virtual size
exactly the raw disk's, which the build keeps a whole number of MiB."""

from __future__ import annotations

from pathlib import Path

from cvmbuild.appliance.disk import MiB
from cvmbuild.appliance.errors import ApplianceError
from cvmbuild.appliance.exporters import ExportContext
from cvmbuild.appliance.exporters.qemu_img import convert


def export(context: ExportContext) -> list[Path]:
    size = context.disk.stat().st_size
    if size % MiB:
        raise ApplianceError(f"{context.disk}: {size} bytes is not a whole number of MiB")
    target = context.output / f"{context.name}.vhd"
    return [convert(context.disk, target, "vpc", "subformat=fixed,force_size=on")]
