"""`cvmfs-client setup`: repositories mounted on demand under /cvmfs by autofs, as
CernVM-FS's `cvmfs_config setup` arranges it, and unmounted by autofs after idling.

It installs two files: a master map entry (auto.master.d/cvmfs-client.autofs) naming
the mount root, and one executable (auto.cvmfs-client) that is both autofs's program
map and, through mount.fuse's PROGRAM#SOURCE form, the mount helper."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from cvmfs_client.errors import ClientError
from cvmfs_client.trust_store import STATE_DIR_ENV

MARKER = "# installed by `cvmfs-client setup`; `cvmfs-client setup --undo` removes it"
SYSTEM_AUTOFS_DIR = "/etc"
DEFAULT_IDLE_S = 300
MASTER_INCLUDE = "+dir:/etc/auto.master.d"


@dataclass(frozen=True)
class Installation:
    autofs_dir: str  # where autofs reads its maps: /etc

    @property
    def map_path(self) -> str:
        return os.path.join(self.autofs_dir, "auto.cvmfs-client")

    @property
    def master_path(self) -> str:
        return os.path.join(self.autofs_dir, "auto.master.d", "cvmfs-client.autofs")


def map_script(client: list[str], config_dir: str) -> str:
    """client: the command that runs cvmfs-client."""
    q, command = shlex.quote, shlex.join(client)
    state_dir = os.environ.get(STATE_DIR_ENV)
    # autofs runs programs with a bare environment: keep a private state directory.
    env = f"export {STATE_DIR_ENV}={q(state_dir)}\n" if state_dir else ""
    return f"""#!/bin/sh
{MARKER}
# autofs runs it with a name under the mount root: it prints that repository's map entry.
# mount.fuse runs it with REPOSITORY MOUNTPOINT -o OPTIONS: it mounts the repository.
{env}if [ "$#" -eq 1 ]; then
    exec {command} config automount-entry "$1" --helper "$0" --config-dir {q(config_dir)}
fi
exec {command} mount "$1" "$2" --config-dir {q(config_dir)}
"""


def map_entry(fqrn: str, helper: str) -> str:
    """An entry mount.fuse turns into `HELPER FQRN MOUNTPOINT -o ...`; autofs reads an
    unescaped # as a comment."""
    return f"-fstype=fuse,ro,nodev,nosuid :{helper}\\#{fqrn}"


def install(
    where: Installation, config_dir: str, mount_root: str, idle_s: int, client: list[str]
) -> list[str]:
    """Write the map (running client) and the master entry; returns what to tell the
    user."""
    for path in (where.map_path, where.master_path):
        _check_ours(path)
    os.makedirs(os.path.dirname(where.master_path), exist_ok=True)
    os.makedirs(mount_root, exist_ok=True)
    _write(where.map_path, map_script(client, os.path.abspath(config_dir)), 0o755)
    entry = f"{MARKER}\n{mount_root} program:{where.map_path} --timeout={idle_s}\n"
    _write(where.master_path, entry, 0o644)
    said = [
        f"installed {where.map_path} (autofs program map and mount helper)",
        f"installed {where.master_path}: repositories mount under {mount_root} on first "
        f"access, unmounted after {idle_s} s idle",
    ]
    master = os.path.join(where.autofs_dir, "auto.master")
    if os.path.isfile(master) and MASTER_INCLUDE not in open(master).read():
        said.append(f"warning: {master} lacks {MASTER_INCLUDE}: add it so autofs reads the entry")
    return said + _reload(where)


def uninstall(where: Installation) -> list[str]:
    said = []
    for path in (where.master_path, where.map_path):
        try:
            with open(path) as f:
                ours = MARKER in f.read()
        except FileNotFoundError:
            said.append(f"{path}: not installed")
            continue
        if not ours:
            raise ClientError(f"{path} was not installed by cvmfs-client setup; remove it by hand")
        os.unlink(path)
        said.append(f"removed {path}")
    return said + _reload(where)


def _check_ours(path: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if MARKER not in f.read():
                raise ClientError(f"{path} exists and was not written by cvmfs-client setup")


def _write(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _reload(where: Installation) -> list[str]:
    """Have the system's autofs read its maps again (a private autofs_dir is the
    caller's own business)."""
    if where.autofs_dir != SYSTEM_AUTOFS_DIR:
        return [f"not the system's autofs maps: run automount {where.master_path}"]
    systemctl = shutil.which("systemctl")
    active = systemctl is not None and (
        subprocess.run([systemctl, "is-active", "--quiet", "autofs"]).returncode == 0
    )
    if not active:
        return ["autofs is not running: start it (systemctl enable --now autofs)"]
    assert systemctl is not None
    result = subprocess.run([systemctl, "reload", "autofs"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ClientError(f"reloading autofs failed: {result.stderr.strip()}")
    return ["autofs reloaded"]
