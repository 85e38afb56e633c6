"""hdd for Parallels Desktop: the NAME.hdd bundle directory holding DiskDescriptor.xml
and the expanding image (.hds, Parallels' own format, written by qemu-img) it names."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from cvmbuild.appliance.disk import SECTOR
from cvmbuild.appliance.exporters import ExportContext
from cvmbuild.appliance.exporters.qemu_img import convert

# Parallels names the single (top) snapshot of every plain disk with this GUID.
TOP_SNAPSHOT = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
NO_PARENT = "{00000000-0000-0000-0000-000000000000}"
BLOCK_SECTORS = 2048  # 1 MiB clusters, qemu-img's default for parallels images


def disk_descriptor(name: str, image_file: str, size: int, disk_uid: str) -> str:
    sectors = size // SECTOR
    cylinders = max(1, sectors // (16 * 63))
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>{cylinders}</Cylinders>
        <PhysicalSectorSize>512</PhysicalSectorSize>
        <Heads>16</Heads>
        <Sectors>63</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{NO_PARENT}</Engine>
            <Data></Data>
        </Encryption>
        <UID>{{{disk_uid}}}</UID>
        <Name>{name}</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
            <SuspendState>0</SuspendState>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>{BLOCK_SECTORS}</Blocksize>
            <Image>
                <GUID>{TOP_SNAPSHOT}</GUID>
                <Type>Compressed</Type>
                <File>{image_file}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>{TOP_SNAPSHOT}</GUID>
            <ParentGUID>{NO_PARENT}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"""


def image_file_name(name: str) -> str:
    return f"{name}.hdd.0.{TOP_SNAPSHOT}.hds"


def export(context: ExportContext) -> list[Path]:
    bundle = context.output / f"{context.name}.hdd"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    image = image_file_name(context.name)
    convert(context.disk, bundle / image, "parallels", f"cluster_size={BLOCK_SECTORS * SECTOR}")
    disk_uid = str(uuid.UUID(context.content_hash[:32]))
    size = context.disk.stat().st_size
    (bundle / "DiskDescriptor.xml").write_text(disk_descriptor(context.name, image, size, disk_uid))
    return [bundle]
