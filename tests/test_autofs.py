"""/cvmfs on demand: `cvmfs-client setup` installs an autofs map, autofs mounts a
repository on first access with the site's configuration and unmounts it once idle.

The test runs its own automount on a private master map and mount root, so the
machine's /etc/auto.master and /cvmfs are left alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import client_daemon, run_cli, stop, wait_gone
from tests.site_fixtures import Site

IDLE_S = 5


def mounts_under(root: Path) -> dict[str, str]:
    """mount point -> file system type, for every mount at or below root."""
    found = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, *_ = line.split()
        if where == str(root) or where.startswith(f"{root}/"):
            found[where] = kind
    return found


def first_access(*command: str | Path) -> str:
    """A command that triggers a mount; bounded, so that a mount that hangs fails the
    test instead of hanging it."""
    return subprocess.run(command, capture_output=True, timeout=120, check=True).stdout.decode()


def until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


@contextlib.contextmanager
def automounter(master: Path, root: Path, log: Path) -> Iterator[None]:
    """automount in the foreground on a private master map; skipped where autofs
    cannot run, with the reason."""
    binary = shutil.which("automount", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("needs autofs (apt-get install autofs)")
    if os.geteuid() != 0:
        pytest.skip("automount needs root")
    if "autofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("the kernel has no autofs file system (modprobe autofs4)")
    with log.open("wb") as out:
        # Its own session: autofs ignores lookups from its own process group. -C: a
        # system automount may run beside it.
        proc = subprocess.Popen(
            [binary, "-f", "-C", "-d", str(master)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while mounts_under(root).get(str(root)) != "autofs":
            if proc.poll() is not None:
                pytest.skip(f"automount cannot run here: {log.read_text()[-500:]}")
            assert time.monotonic() < deadline, f"automount did not mount {root}: {log.read_text()}"
            time.sleep(0.1)
        yield
    finally:
        stop(proc)  # automount unmounts what it mounted as it exits
        for where in sorted(mounts_under(root), reverse=True):
            subprocess.run(["umount", "-l", where], capture_output=True)


def test_a_repository_mounts_on_first_access_and_unmounts_when_idle(
    site: Site, tmp_path: Path
) -> None:
    autofs_dir, root = tmp_path / "autofs", tmp_path / "cvmfs"
    setup = run_cli(
        "cvmfs-client", "setup", "--config-dir", site.etc, "--mount-root", root,
        "--autofs-dir", autofs_dir, "--idle-timeout", str(IDLE_S),
    )  # fmt: skip
    master = autofs_dir / "auto.master.d" / "cvmfs-client.autofs"
    helper = autofs_dir / "auto.cvmfs-client"
    assert master.read_text().splitlines()[-1] == f"{root} program:{helper} --timeout={IDLE_S}"
    assert os.access(helper, os.X_OK)
    assert setup.stdout.decode().splitlines()[0] == (
        f"installed {helper} (autofs program map and mount helper)"
    )

    with automounter(master, root, tmp_path / "automount.log"):
        assert mounts_under(root) == {str(root): "autofs"}  # nothing until it is used
        assert first_access("ls", root / "sw.example.org" / "sw").split() == ["bin", "setup.sh"]
        assert mounts_under(root).get(str(root / "sw.example.org")) == "fuse"
        daemon = client_daemon(root / "sw.example.org")
        assert daemon is not None
        assert (root / "sw.example.org" / "sw" / "setup.sh").read_text() == "echo sw 1.0\n"
        # A bare name gets CVMFS_DEFAULT_DOMAIN, as /cvmfs/atlas is atlas.cern.ch.
        assert first_access("cat", root / "data" / "sw" / "README") == "calibration data\n"
        assert mounts_under(root).get(str(root / "data")) == "fuse"
        assert not (root / "nothing.example.org").exists()  # not configured: not there

        # Left alone, each is unmounted by autofs and its client exits.
        until(lambda: len(mounts_under(root)) == 1, 30 + 4 * IDLE_S, "idle mounts unmounted")
        wait_gone(daemon)
        # And mounted again on the next access.
        assert first_access("cat", root / "sw.example.org" / "sw" / "setup.sh") == "echo sw 1.0\n"

    undo = run_cli("cvmfs-client", "setup", "--undo", "--autofs-dir", autofs_dir)
    assert undo.stdout.decode().splitlines()[:2] == [f"removed {master}", f"removed {helper}"]
    assert not master.exists() and not helper.exists()


def test_setup_leaves_files_it_did_not_write_alone(site: Site, tmp_path: Path) -> None:
    helper = tmp_path / "autofs" / "auto.cvmfs-client"
    helper.parent.mkdir()
    helper.write_text("#!/bin/sh\n# the site's own map\n")
    result = run_cli(
        "cvmfs-client", "setup", "--config-dir", site.etc, "--autofs-dir", helper.parent,
        "--mount-root", tmp_path / "cvmfs", check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"error: {helper} exists and was not written by cvmfs-client setup\n"
    )
    assert helper.read_text() == "#!/bin/sh\n# the site's own map\n"
    result = run_cli("cvmfs-client", "setup", "--undo", "--autofs-dir", helper.parent, check=False)
    assert result.returncode == 1
    assert helper.exists()


def test_the_map_names_configured_repositories_only(site: Site, tmp_path: Path) -> None:
    helper = tmp_path / "auto.cvmfs-client"

    def entry(name: str) -> tuple[int, str]:
        result = run_cli(
            "cvmfs-client", "config", "automount-entry", name, "--helper", helper,
            "--config-dir", site.etc, check=False,
        )  # fmt: skip
        return result.returncode, result.stdout.decode()

    assert entry("sw.example.org") == (
        0,
        f"-fstype=fuse,ro,nodev,nosuid :{helper}\\#sw.example.org\n",
    )
    assert entry("data") == (0, f"-fstype=fuse,ro,nodev,nosuid :{helper}\\#data.example.org\n")
    assert entry("other.org") == (1, "")  # no CVMFS_SERVER_URL for it
    assert entry(".hidden") == (1, "")  # not a repository name
    site.write("config.d/extra.example.org.conf", "CVMFS_REPOSITORY_TAG=v1\n")
    assert entry("extra.example.org")[0] == 0  # the domain gives it a URL
    site.write("default.d/60-strict.conf", "CVMFS_STRICT_MOUNT=yes\n")
    assert entry("extra.example.org") == (1, "")  # not in CVMFS_REPOSITORIES
    assert entry("sw.example.org")[0] == 0
