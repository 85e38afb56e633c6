"""The disks `cvmbuild boot` gives QEMU: the image (found inside an OVA or a Parallels
bundle, and checked to be a disk image at all), the generated config drive, the cache
disk.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from cvmbuild.appliance.errors import BootError, ToolError
from cvmbuild.appliance.exporters import qemu_img
from cvmbuild.appliance.exporters.hdd import image_file_name
from cvmbuild.appliance.process import run

# A fixed VHD has its only header at the end, so qemu-img's probing takes it for raw.
BY_SUFFIX = {".raw": "raw", ".img": "raw", ".qcow2": "qcow2", ".vdi": "vdi", ".vmdk": "vmdk",
             ".vhd": "vpc"}  # fmt: skip


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


def check_disk(disk: Path, fmt: str, shown: Path) -> None:
    """Refuse at once what is not a bootable disk image: qemu-img reads any file as raw,
    and QEMU would then wait at the firmware's "no bootable device" until the timeout."""
    if fmt != "raw":
        try:
            qemu_img.info(disk, fmt)
        except ToolError as exc:
            last = str(exc).splitlines()[-1]
            raise BootError(f"{shown}: not a {fmt} disk image ({last})") from None
        return
    with open(disk, "rb") as f:
        sector = f.read(512)
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        raise BootError(
            f"{shown}: not a disk image (no boot sector): give a raw, qcow2, vdi, vmdk or "
            "vhd image, an .ova or an .hdd bundle"
        )


def make_cache_disk(path: Path, size: str) -> None:
    """An empty qcow2 disk the appliance formats (label CVMCACHE) on its first boot."""
    if path.exists():
        check_disk(path, "qcow2", path)
        return
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, size])
