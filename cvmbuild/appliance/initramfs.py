"""The appliance's initramfs: busybox, the selected kernel modules and an /init that
loads them, finds the squashfs root, lays a tmpfs overlay over it, brings the network
up with DHCP and hands over to the guest agent (guest_agent.py) as PID 1.
"""

from __future__ import annotations

from pathlib import Path

import zstandard

from cvmbuild.appliance import cpio
from cvmbuild.appliance.kmod import ModuleSelection

AGENT_PATH = "/usr/lib/cvmappliance/agent.py"

INIT = r"""#!/bin/busybox sh
# First stage of the thin appliance (written by cvmbuild/appliance/initramfs.py).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "CVMAPPLIANCE: $*"; }
fail() { say "error: $*"; sleep 2; poweroff -f; }
say "initramfs: loading drivers"
while read -r module; do insmod "/lib/modules/$module" 2>/dev/null; done < /lib/modules/load-order
root=""
tries=0
while [ -z "$root" ]; do
  for dev in /sys/class/block/*; do
    name=${dev##*/}
    [ -f "$dev/partition" ] || continue
    if [ "$(dd if=/dev/$name bs=4 count=1 2>/dev/null)" = "hsqs" ]; then root=/dev/$name; break; fi
  done
  [ -n "$root" ] && break
  tries=$((tries + 1))
  [ $tries -gt 150 ] && fail "no squashfs root partition found on any disk"
  sleep 0.1
done
mount -t squashfs -o ro "$root" /lower || fail "cannot mount the root file system $root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
  || fail "cannot mount the writable overlay"
ip link set lo up
network=none
for path in /sys/class/net/*; do
  nic=${path##*/}
  [ "$nic" = lo ] && continue
  ip link set "$nic" up
  if udhcpc -i "$nic" -f -n -q -t 5 -T 2 -s /etc/udhcpc.script >/dev/null 2>&1; then
    network="$nic $(ip -4 -o addr show dev $nic | awk '{print $4}')"
    break
  fi
done
say "initramfs: root $root, network $network"
cat /etc/resolv.conf > /newroot/etc/resolv.conf 2>/dev/null
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /usr/bin/python3 -I @AGENT@
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    for gateway in $router; do route add default gw "$gateway" dev "$interface"; break; done
    : > /etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    ;;
esac
exit 0
"""

_DIRECTORIES = ["bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "run", "tmp",
                "lower", "rw", "newroot"]  # fmt: skip


def build_initramfs(
    busybox: bytes, modules_root: Path, selection: ModuleSelection, epoch: int
) -> bytes:
    """The zstd-compressed initramfs (the kernel's CONFIG_RD_ZSTD)."""
    entries = [cpio.directory(d) for d in _DIRECTORIES]
    entries += [
        cpio.file("init", INIT.replace("@AGENT@", AGENT_PATH).encode(), 0o755),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755),
        cpio.char_device("dev/console", 5, 1),
        cpio.file(
            "lib/modules/load-order", "".join(p + "\n" for p in selection.load_order).encode()
        ),
    ]
    seen = set(_DIRECTORIES)
    for rel in selection.load_order:
        parts = Path("lib/modules", rel).parts
        for i in range(3, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                entries.append(cpio.directory(parent))
        entries.append(cpio.file(f"lib/modules/{rel}", (modules_root / rel).read_bytes()))
    raw = cpio.archive(entries, mtime=epoch)
    return zstandard.ZstdCompressor(level=12).compress(raw)
