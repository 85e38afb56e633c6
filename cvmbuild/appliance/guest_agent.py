"""The appliance's PID 1 (copied into the image; standard library only, imports nothing
from cvmbuild): contextualise, mount the repositories with cvmfs-client, run the job.

Settings: /etc/cvmappliance/appliance.json (from the recipe), overridden by user data
(cloud-config, MIME multipart or the appliance's TOML; found as cloud-init finds it: a
NoCloud drive labelled cidata, an OpenStack config drive labelled config-2, EC2's or
OpenStack's metadata service: seeds.py, cloud_config.py), overridden in turn by the
kernel command line (cvm.repo_url=, cvm.proxy=, cvm.job64=). A disk labelled CVMCACHE,
or an empty one, keeps the repositories' cache across boots (cache_disk.py).
Progress goes to the console as `CVMAPPLIANCE: ...` lines that `cvmbuild boot` and the
BOINC VM wrapper read (the protocol: cvmbuild/boinc/console.py).

With a `[copilot]` user-data table the job is the Co-Pilot agent (copilot_agent.py, carried
beside this file): it pulls jobs from a manager until it has been idle for idle_exit_s,
mounting each repository a job names at /cvmfs/NAME; its exit status is the job's.

The job runs in its own directory (env CVM_JOB_DIR): the FAT output disk labelled CVMOUT
when there is one (the VM wrapper copies the job's outputs off it), under vboxwrapper the
shared folder, else a plain directory; files under the config drive's input/ are copied
into it first. The job reports progress by writing a fraction to CVM_PROGRESS_FILE.
Under vboxwrapper (a vboxsf share named `shared`) the agent also keeps its guest
contract: user data from shared/user-data, shared/heartbeat touched, shared/progress
written, the job's exit code in shared/shutdown.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

try:
    from cvmbuild.appliance import cache_disk, cloud_config, context, copilot_agent, seeds
except ImportError:  # in the image (python3 -I): these modules lie beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cache_disk  # type: ignore[no-redef]
    import cloud_config  # type: ignore[no-redef]
    import context  # type: ignore[no-redef]
    import copilot_agent  # type: ignore[no-redef]
    import seeds  # type: ignore[no-redef]

# The settings and how user data changes them (pure): context.py.
COPILOT_WORK = context.COPILOT_WORK
RUNCMD_DIR = context.RUNCMD_DIR
ContextError = context.ContextError
RepoSettings = context.RepoSettings
Settings = context.Settings
apply_cloud_config = context.apply_cloud_config
apply_overrides = context.apply_overrides
parse_cmdline = context.parse_cmdline
parse_user_data = context.parse_user_data
read_user_data = context.read_user_data
runcmd_script = context.runcmd_script
settings_from_json = context.settings_from_json

SETTINGS_FILE = "/etc/cvmappliance/appliance.json"
MARK = "CVMAPPLIANCE:"  # the protocol's host side: cvmbuild/boinc/console.py
JOB_DIR = "/run/job"
OUTPUT_LABEL = "CVMOUT"
HEARTBEAT_S = 30
PROGRESS_POLL_S = 5
# vboxwrapper's guest contract: the share's name and mount point, and the file names
# the BOINC app's vbox_job.xml gives as heartbeat_filename, fraction_done_filename and
# completion_trigger_file.
VBOX_SHARE = "shared"
VBOX_MOUNT = "/shared"
VBOX_HEARTBEAT = "heartbeat"
VBOX_PROGRESS = "progress"
VBOX_SHUTDOWN = "shutdown"
AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
parse_progress = copilot_agent.parse_progress
fat_label = seeds.fat_label
copy_tree = seeds.copy_tree


def parse_stats(raw: bytes) -> tuple[str, int]:
    stats = json.loads(raw)
    return str(stats.get("repository", "")), int(stats.get("revision", 0))


def completion_text(status: int, message: str = "") -> str:
    """vboxwrapper's completion_trigger_file: the exit code on line 1, then is_notice
    and a message for the volunteer."""
    return f"{status}\n" + (f"0\n{message}\n" if message else "")


@dataclass(frozen=True)
class JobPlace:
    """Where the job runs: its directory, the output disk mounted there (to unmount
    after the job) and vboxwrapper's shared directory when there is one."""

    dir: str = JOB_DIR
    output_device: str | None = None
    shared: str | None = None

    @property
    def progress_file(self) -> str:
        return os.path.join(self.dir, ".progress")

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "CVM_JOB_DIR": self.dir, "CVM_PROGRESS_FILE": self.progress_file}


# -- the edges: console, devices, network, processes ---------------------------------


_say_lock = threading.Lock()


def say(message: str) -> None:
    with _say_lock:  # the heartbeat thread talks too: one whole line per write
        sys.stdout.write(f"{MARK} {message}\n")
        sys.stdout.flush()


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ContextError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")


def early_mounts() -> None:
    for fstype, target, options in (
        ("tmpfs", "/run", "mode=0755"),
        ("tmpfs", "/tmp", "mode=1777"),
        ("devpts", "/dev/pts", "gid=5,mode=620"),
        ("tmpfs", "/dev/shm", "mode=1777"),
    ):
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", "-t", fstype, "-o", options, fstype, target], check=False)


def prepare_job_place() -> JobPlace:
    """vboxwrapper's shared folder, else the CVMOUT output disk, else a plain directory."""
    if os.path.exists("/dev/vboxguest"):
        os.makedirs(VBOX_MOUNT, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "vboxsf", VBOX_SHARE, VBOX_MOUNT],
                                 capture_output=True)  # fmt: skip
        if mounted.returncode == 0:
            return JobPlace(dir=VBOX_MOUNT, shared=VBOX_MOUNT)
    os.makedirs(JOB_DIR, exist_ok=True)
    found = seeds.labelled(OUTPUT_LABEL)
    if found is None:
        return JobPlace()
    _run(["mount", "-t", "vfat", found[0], JOB_DIR])
    return JobPlace(output_device=found[0])


# Held while the progress file is open, so that unmounting the job's directory never
# meets it busy.
_job_dir_lock = threading.Lock()


def finish_job_place(place: JobPlace, status: int) -> None:
    """Make the job's results durable where the host reads them."""
    if place.output_device is not None:
        os.sync()
        os.chdir("/")
        with _job_dir_lock:
            _run(["umount", place.dir])
        say("outputs written")
    if place.shared is not None:
        write_file(os.path.join(place.shared, VBOX_SHUTDOWN), completion_text(status))


def write_file(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class Liveness(threading.Thread):
    """The agent's heartbeat every 30 s and the job's progress, relayed to the console
    (and to vboxwrapper's files under a shared folder)."""

    def __init__(self, place: JobPlace) -> None:
        super().__init__(name="liveness", daemon=True)
        self.place = place
        self.reported: float | None = None
        self.stopped = threading.Event()  # a shell has the console: no more lines

    def run(self) -> None:
        next_beat = 0.0
        while not self.stopped.is_set():
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    self.beat()
                self.relay_progress()
            except OSError as exc:  # a full or vanished share must not stop the beat
                say(f"liveness: {exc}")
            time.sleep(PROGRESS_POLL_S)

    def beat(self) -> None:
        say("heartbeat")
        if self.place.shared is not None:
            path = os.path.join(self.place.shared, VBOX_HEARTBEAT)
            with open(path, "a"):
                pass
            os.utime(path)

    def relay_progress(self) -> None:
        try:
            with _job_dir_lock, open(self.place.progress_file, errors="replace") as f:
                fraction = parse_progress(f.read())
        except FileNotFoundError:
            return
        if fraction is None or fraction == self.reported:
            return
        self.reported = fraction
        say(f"progress {fraction:.4f}")
        if self.place.shared is not None:
            write_file(os.path.join(self.place.shared, VBOX_PROGRESS), f"{fraction:.4f}\n")


def shared_user_data(place: JobPlace) -> seeds.Found | None:
    if place.shared is None:
        return None
    path = os.path.join(place.shared, "user-data")
    try:
        with open(path, encoding="utf-8") as f:
            return seeds.Found(f.read(), path)
    except FileNotFoundError:
        return None


def find_user_data(place: JobPlace) -> seeds.Found | None:
    """The first source cloud-init's order would take (vboxwrapper's share first)."""
    found = shared_user_data(place) or seeds.nocloud(place.dir) or seeds.config_drive()
    if found is None and seeds.on_ec2():
        found = seeds.imds_user_data()
    if found is None and seeds.on_openstack():
        found = seeds.openstack_user_data()
    return found


def contextualise(place: JobPlace) -> Settings:
    with open(SETTINGS_FILE, encoding="utf-8") as f:
        settings = settings_from_json(f.read())
    found = find_user_data(place)
    if found is not None:
        try:
            meta = cloud_config.parse_meta_data(found.meta_data, found.source, found.meta_json)
        except cloud_config.UserDataError as exc:
            raise ContextError(str(exc)) from None
        if meta.hostname:
            settings = replace(settings, hostname=meta.hostname)
        keys = list(meta.public_keys)
        if found.user_data is None:
            say(f"user data from {found.source}: none (meta-data only)")
        else:
            data = read_user_data(found.user_data, found.source)
            say(f"user data from {found.source}: {data.format}, keys {', '.join(data.keys)}")
            settings = apply_overrides(settings, data.tables)
            if data.cloud is not None:
                settings = apply_cloud_config(settings, data.cloud)
                perform(data.cloud)
                keys += data.cloud.ssh_authorized_keys
        if keys:
            os.makedirs(os.path.dirname(AUTHORIZED_KEYS), mode=0o700, exist_ok=True)
            write_file(AUTHORIZED_KEYS, "".join(k.strip() + "\n" for k in keys))
            say(f"{len(keys)} SSH keys in {AUTHORIZED_KEYS} (this image runs no SSH server)")
    with open("/proc/cmdline") as f:
        settings = apply_overrides(settings, parse_cmdline(f.read()))
    return settings


def perform(cloud: cloud_config.CloudConfig) -> None:
    """cloud-config's write_files now; runcmd and scripts as the job's files."""
    for item in cloud.write_files:
        os.makedirs(os.path.dirname(item.path), exist_ok=True)
        with open(item.path, "ab" if item.append else "wb") as f:
            f.write(item.content)
        os.chmod(item.path, item.permissions)
        user, _, group = item.owner.partition(":")
        shutil.chown(item.path, user or "root", group or "root")
    if cloud.runcmd or cloud.scripts:
        os.makedirs(RUNCMD_DIR, exist_ok=True)
        for i, script in enumerate(cloud.scripts):
            write_file(f"{RUNCMD_DIR}/script-{i}", script)
            os.chmod(f"{RUNCMD_DIR}/script-{i}", 0o755)
        write_file(f"{RUNCMD_DIR}/runcmd", runcmd_script(cloud))


def mount_repository(repo: RepoSettings) -> None:
    os.makedirs(repo.mount_point, exist_ok=True)
    key_file = f"/etc/cvmfs-keys/{repo.name}.pub"
    if repo.public_key.strip().startswith("-----BEGIN"):
        os.makedirs("/etc/cvmfs-keys", exist_ok=True)
        with open(key_file, "w") as f:
            f.write(repo.public_key)
    if not os.path.exists(key_file):
        raise ContextError(
            f"no public key for {repo.name}: put one in the recipe or give "
            "[repository] public_key in user data"
        )
    cache = f"{cache_disk.MOUNT}/{repo.name}"
    # --name: the manifest must carry the name the user configured, or nothing is mounted
    command = ["cvmfs-client", "mount", repo.url, repo.mount_point, "--key", key_file,
               "--name", repo.name, "--cache-dir", cache, "--quota", repo.cache_quota,
               "--proxy", repo.proxy]  # fmt: skip
    say(f"mounting {repo.url} at {repo.mount_point}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().removeprefix("error: ") or f"exit {result.returncode}"
        try:
            with open(f"{cache}/client.log") as f:
                detail += " | " + " ".join(f.read().splitlines()[-3:])
        except OSError:
            pass
        raise ContextError(f"{repo.name} not mounted at {repo.mount_point}: {detail}")
    name, revision = parse_stats(os.getxattr(repo.mount_point, "user.stats"))
    say(f"mounted {name} revision {revision} at {repo.mount_point}")


def run_job(command: str, place: JobPlace, run: Callable[[], int] | None = None) -> int:
    say(f"job start: {command}")
    started = time.monotonic()
    if run is not None:
        status = run()
    else:
        env = place.environment(dict(os.environ))
        status = subprocess.run(["/bin/sh", "-c", command], cwd=place.dir, env=env).returncode
    sys.stdout.flush()
    say(f"job exit {status} after {time.monotonic() - started:.1f} s")
    return status


def run_copilot(settings: Settings, place: JobPlace) -> int:
    """The Co-Pilot agent as the appliance's job; the repositories its jobs name are
    mounted with the proxy of the appliance's first repository."""
    assert settings.copilot is not None
    proxy = settings.repositories[0].proxy if settings.repositories else "DIRECT"

    def mount_at(repo: copilot_agent.Repository, point: str) -> None:
        mount_repository(RepoSettings(repo.name, repo.url, point, repo.public_key, proxy))

    config = replace(settings.copilot, summary_dir=place.dir)
    return copilot_agent.run_in_appliance(config, mount_at, say, place.progress_file)


def power_off() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    with open("/proc/sysrq-trigger", "w") as f:  # if the reboot call was refused
        f.write("o")


def shell() -> None:
    """`cvmbuild boot --shell`: a login shell on the serial console, for debugging."""
    tty = "/dev/ttyS0" if os.path.exists("/dev/ttyS0") else "/dev/console"
    say("shell on the console: `exit` powers the appliance off")
    with open(tty, "r+b", buffering=0) as console:
        env = {**os.environ, "TERM": "vt100"}
        subprocess.run(["setsid", "-c", "/bin/bash", "-i"], stdin=console, stdout=console,
                       stderr=console, env=env)  # fmt: skip


def stay() -> None:
    say("staying up")
    while True:
        try:
            os.wait()  # PID 1 reaps orphans
        except ChildProcessError:
            time.sleep(60)


def main() -> int:
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if os.getpid() == 1:  # the initramfs's PATH=/bin came along through switch_root
        os.environ["PATH"] = path
    os.environ.setdefault("PATH", path)
    os.environ.setdefault("HOME", "/root")
    os.environ.setdefault("LANG", "C.UTF-8")
    then = "poweroff"
    place: JobPlace | None = None
    liveness: Liveness | None = None
    try:
        early_mounts()
        say(f"agent started, uptime {open('/proc/uptime').read().split()[0]} s")
        place = prepare_job_place()
        liveness = Liveness(place)
        liveness.start()
        settings = contextualise(place)
        then = settings.then
        if then not in ("poweroff", "stay", "shell"):
            raise ContextError(f"[job] then = {then!r}: choose poweroff, stay or shell")
        socket.sethostname(settings.hostname)
        cache_disk.attach(say)
        for repo in settings.repositories:
            mount_repository(repo)
        copilot = settings.copilot
        if copilot is not None or settings.job:
            if copilot is not None:
                what = f"copilot agent {copilot.name} for {copilot.url}"
                status = run_job(what, place, lambda: run_copilot(settings, place))
            else:
                status = run_job(settings.job, place)
            liveness.relay_progress()  # the last fraction may be younger than the poll
            finish_job_place(place, status)
        else:
            say("no job to run")
    except Exception as exc:  # PID 1 must report, never die with a traceback
        say(f"error: {exc}")
        if place is not None and place.shared is not None:
            try:
                write_file(os.path.join(place.shared, VBOX_SHUTDOWN), completion_text(1, str(exc)))
            except OSError:
                pass
    if os.getpid() != 1:
        return 0
    if then == "stay":
        stay()
    if then == "shell":
        if liveness is not None:
            liveness.stopped.set()
        shell()
    say("powering off")
    power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
