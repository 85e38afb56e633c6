"""vdi for VirtualBox: a dynamically allocated image (only written blocks are stored)."""

from __future__ import annotations

from pathlib import Path

from cvmbuild.appliance.exporters import ExportContext
from cvmbuild.appliance.exporters.qemu_img import convert


def export(context: ExportContext) -> list[Path]:
    return [convert(context.disk, context.output / f"{context.name}.vdi", "vdi", "static=off")]
