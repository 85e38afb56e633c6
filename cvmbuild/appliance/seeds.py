"""Where the appliance's user data comes from, as cloud-init looks for it (copied into the
image beside the guest agent): a NoCloud drive labelled `cidata` (FAT or ISO9660:
`user-data`, `meta-data`), an OpenStack config drive labelled `config-2`
(`openstack/latest/user_data`, `meta_data.json`), EC2's and OpenStack's metadata
services. File systems are told apart by their labels read off the devices (pure
functions below), never by device names, which differ between hypervisors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass

MOUNT = "/run/seed"
NOCLOUD_LABEL = "CIDATA"
CONFIG_DRIVE_LABEL = "CONFIG-2"
ISO_PVD = 16 * 2048  # ISO9660's primary volume descriptor
EXT_SUPERBLOCK = 1024
HEAD = ISO_PVD + 2048  # enough of a device to read any of the three labels
IMDS = "http://169.254.169.254/latest"
OPENSTACK_METADATA = "http://169.254.169.254/openstack/latest"


@dataclass(frozen=True)
class Found:
    user_data: str | None
    source: str  # for the console: which drive or service
    meta_data: str = ""
    meta_json: bool = False  # meta_data.json (OpenStack) rather than NoCloud's YAML


# -- labels (pure) -----------------------------------------------------------------------


def fat_label(boot_sector: bytes) -> str | None:
    """The volume label of a FAT12/16/32 boot sector, or None if it is not FAT."""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        return None
    if boot_sector[82:90].startswith(b"FAT32"):
        return boot_sector[71:82].decode("ascii", "replace").strip()
    if boot_sector[54:62].startswith(b"FAT"):
        return boot_sector[43:54].decode("ascii", "replace").strip()
    return None


def iso9660_label(head: bytes) -> str | None:
    """The volume identifier of an ISO9660 image (from its first 34 KiB), or None."""
    pvd = head[ISO_PVD : ISO_PVD + 2048]
    if len(pvd) < 72 or pvd[0] != 1 or pvd[1:6] != b"CD001":
        return None
    return pvd[40:72].decode("ascii", "replace").strip()


def ext_label(head: bytes) -> str | None:
    """The label of an ext2/3/4 file system (from its first 2 KiB), or None."""
    block = head[EXT_SUPERBLOCK : EXT_SUPERBLOCK + 1024]
    if len(block) < 136 or block[56:58] != b"\x53\xef":
        return None
    return block[120:136].split(b"\0")[0].decode("utf-8", "replace")


def probe(head: bytes) -> tuple[str, str] | None:
    """(file system type for mount, label) of a device's first bytes, or None."""
    for fstype, read in (("iso9660", iso9660_label), ("ext4", ext_label), ("vfat", fat_label)):
        label = read(head)
        if label is not None:
            return fstype, label
    return None


# -- devices -----------------------------------------------------------------------------


def read_head(device: str, size: int = HEAD) -> bytes | None:
    try:
        with open(device, "rb") as f:
            return f.read(size)
    except OSError:  # an empty CD drive, a device that went away
        return None


def labelled(wanted: str) -> tuple[str, str] | None:
    """(device, file system type) of the first block device labelled wanted (any case)."""
    for name in sorted(os.listdir("/sys/class/block")):
        head = read_head(f"/dev/{name}")
        found = probe(head) if head else None
        if found is not None and found[1].upper() == wanted.upper():
            return f"/dev/{name}", found[0]
    return None


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")


def read_drive(
    device: str, fstype: str, names: list[str], copy_input_to: str | None
) -> dict[str, str]:
    """The text of the files names (those present) on a read-only drive; its input/
    directory is copied into copy_input_to while it is mounted."""
    os.makedirs(MOUNT, exist_ok=True)
    _run(["mount", "-t", fstype, "-o", "ro", device, MOUNT])
    try:
        if copy_input_to is not None and os.path.isdir(f"{MOUNT}/input"):
            copy_tree(f"{MOUNT}/input", copy_input_to)
        texts = {}
        for name in names:
            try:
                with open(os.path.join(MOUNT, name), encoding="utf-8") as f:
                    texts[name] = f.read()
            except FileNotFoundError:
                pass
        return texts
    finally:
        subprocess.run(["umount", MOUNT], check=False)


def copy_tree(source: str, target: str) -> None:
    """Contents only: a FAT target takes neither owners nor modes."""
    for root, _dirs, files in os.walk(source):
        into = os.path.join(target, os.path.relpath(root, source))
        os.makedirs(into, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(root, name), os.path.join(into, name))


def nocloud(job_dir: str) -> Found | None:
    """cloud-init's NoCloud: a FAT or ISO9660 drive labelled cidata."""
    drive = labelled(NOCLOUD_LABEL)
    if drive is None:
        return None
    device, fstype = drive
    texts = read_drive(device, fstype, ["user-data", "meta-data"], job_dir)
    source = f"NoCloud drive {device} ({fstype}, label cidata)"
    return Found(texts.get("user-data"), source, texts.get("meta-data", ""))


def config_drive() -> Found | None:
    """OpenStack's config drive: ISO9660 (or FAT) labelled config-2."""
    drive = labelled(CONFIG_DRIVE_LABEL)
    if drive is None:
        return None
    device, fstype = drive
    user, meta = "openstack/latest/user_data", "openstack/latest/meta_data.json"
    texts = read_drive(device, fstype, [user, meta], None)
    source = f"config drive {device} ({fstype}, label config-2)"
    return Found(texts.get(user), source, texts.get(meta, ""), meta_json=True)


# -- metadata services -------------------------------------------------------------------


def _dmi(field: str) -> str:
    try:
        with open(f"/sys/class/dmi/id/{field}") as f:
            return f.read().strip()
    except OSError:
        return ""


def on_ec2() -> bool:
    if _dmi("sys_vendor").startswith("Amazon EC2"):
        return True
    try:
        with open("/sys/hypervisor/uuid") as f:
            return f.read().startswith("ec2")
    except OSError:
        return False


def on_openstack() -> bool:
    return "OpenStack" in _dmi("product_name") or "OpenStack" in _dmi("sys_vendor")


def _get(request: urllib.request.Request) -> str | None:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def imds_user_data(base: str = IMDS) -> Found | None:
    """User data from EC2's instance metadata service, IMDSv2 (token first)."""
    token_request = urllib.request.Request(
        f"{base}/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    with urllib.request.urlopen(token_request, timeout=5) as response:
        token = response.read().decode()
    headers = {"X-aws-ec2-metadata-token": token}
    text = _get(urllib.request.Request(f"{base}/user-data", headers=headers))
    return None if text is None else Found(text, "EC2 instance metadata")


def openstack_user_data(base: str = OPENSTACK_METADATA) -> Found | None:
    """User data and meta_data.json from OpenStack's metadata service."""
    text = _get(urllib.request.Request(f"{base}/user_data"))
    meta = _get(urllib.request.Request(f"{base}/meta_data.json")) or ""
    if text is None and not meta:
        return None
    return Found(text, "OpenStack metadata service", meta, meta_json=True)
