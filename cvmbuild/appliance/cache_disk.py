"""The appliance's persistent cache disk, as microCernVM's (copied into the image beside
the guest agent): a file system labelled CVMCACHE is mounted where cvmfs-client keeps its
caches and revision floors; else the first whole disk that is empty (its first MiB all
zeros: never a partition table, a file system or a seed) is formatted ext4 with that
label. Without one the cache lives in RAM and every boot starts cold.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

try:
    from cvmbuild.appliance import seeds
except ImportError:  # in the image: seeds.py lies beside this file
    import seeds  # type: ignore[no-redef]

LABEL = "CVMCACHE"
MOUNT = "/var/lib/cvmfs-client"  # the client's cache base and state directory (as root)
EMPTY_PROBE = 1024 * 1024


def is_empty(head: bytes) -> bool:
    return len(head) > 0 and not any(head)


def _sys(name: str, attribute: str) -> str:
    try:
        with open(f"/sys/class/block/{name}/{attribute}") as f:
            return f.read().strip()
    except OSError:
        return ""


def find() -> tuple[str, bool] | None:
    """(device, needs formatting) of the cache disk, or None."""
    empty = None
    for name in sorted(os.listdir("/sys/class/block")):
        if _sys(name, "ro") == "1" or _sys(name, "size") in ("", "0"):
            continue
        head = seeds.read_head(f"/dev/{name}", EMPTY_PROBE)
        if not head:
            continue
        found = seeds.probe(head)
        if found is not None and found[1] == LABEL:
            return f"/dev/{name}", False
        whole = not os.path.exists(f"/sys/class/block/{name}/partition")
        if empty is None and whole and is_empty(head):
            empty = f"/dev/{name}"
    return (empty, True) if empty else None


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")


def attach(say: Callable[[str], None]) -> str | None:
    """Mount the cache disk at MOUNT (formatting an empty one first); the device or None."""
    found = find()
    if found is None:
        say("cache in memory: no cache disk (an empty disk or one labelled CVMCACHE)")
        return None
    device, new = found
    if new:
        say(f"cache disk {device}: empty, formatting it ext4 (label {LABEL})")
        _run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-m", "0", device])
    os.makedirs(MOUNT, exist_ok=True)
    _run(["mount", "-t", "ext4", "-o", "noatime", device, MOUNT])
    stat = os.statvfs(MOUNT)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize // (1024 * 1024)
    size = stat.f_blocks * stat.f_frsize // (1024 * 1024)
    say(f"cache disk {device}: {'new' if new else 'reused'}, {used} of {size} MiB used")
    return device
