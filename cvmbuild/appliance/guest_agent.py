"""The appliance's PID 1 (copied into the image; standard library only, imports nothing
from cvmbuild): contextualise, mount the repositories with cvmfs-client, run the job.

Settings: /etc/cvmappliance/appliance.json (from the recipe), overridden by user data
(a config drive labelled CIDATA with a `user-data` file, or EC2 instance metadata),
overridden in turn by the kernel command line (cvm.repo_url=, cvm.proxy=, cvm.job64=).
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

import base64
import binascii
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace

try:
    from cvmbuild.appliance import copilot_agent
except ImportError:  # in the image (python3 -I): copilot_agent.py lies beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import copilot_agent  # type: ignore[no-redef]

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
USER_DATA_KEYS = {
    "repository": {"url", "proxy", "public_key", "name", "mount_point"},
    "job": {"command", "then"},
    "copilot": set(copilot_agent.USER_DATA_KEYS),
}
COPILOT_WORK = "/run/copilot"  # tmpfs: jobs may need modes and links, which FAT lacks
parse_progress = copilot_agent.parse_progress


class ContextError(Exception):
    """User data or settings the appliance cannot use."""


@dataclass(frozen=True)
class RepoSettings:
    name: str
    url: str
    mount_point: str
    public_key: str = ""  # PEM text
    proxy: str = "DIRECT"
    cache_quota: str = "1G"


@dataclass(frozen=True)
class Settings:
    hostname: str = "cvm-appliance"
    repositories: list[RepoSettings] = field(default_factory=list)
    job: str = ""
    then: str = "poweroff"
    copilot: copilot_agent.AgentConfig | None = None  # user data only


def settings_from_json(text: str) -> Settings:
    data = json.loads(text)
    repos = [RepoSettings(**r) for r in data.get("repositories", [])]
    return Settings(
        hostname=data.get("hostname", "cvm-appliance"),
        repositories=repos,
        job=data.get("job", ""),
        then=data.get("then", "poweroff"),
    )


def settings_to_json(settings: Settings) -> str:
    return json.dumps(
        {
            "hostname": settings.hostname,
            "repositories": [r.__dict__ for r in settings.repositories],
            "job": settings.job,
            "then": settings.then,
        },
        indent=2,
        sort_keys=True,
    )


def parse_user_data(text: str, source: str) -> dict[str, dict[str, str]]:
    """User data is TOML: [repository] url/proxy/public_key/name/mount_point, [job]
    command/then, [copilot] url/token/idle_exit_s/name. Anything else is refused,
    naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ContextError(f"{source}: not valid TOML: {exc}") from exc
    out: dict[str, dict[str, str]] = {}
    for table, values in data.items():
        if table not in USER_DATA_KEYS or not isinstance(values, dict):
            known = ", ".join(USER_DATA_KEYS)
            raise ContextError(f"{source}: unknown table [{table}] (known: {known})")
        for key, value in values.items():
            if key not in USER_DATA_KEYS[table]:
                known = ", ".join(sorted(USER_DATA_KEYS[table]))
                raise ContextError(f"{source}: [{table}] unknown key {key!r} (known: {known})")
            if not isinstance(value, str):
                raise ContextError(f"{source}: [{table}] {key} must be a string")
        out[table] = dict(values)
    return out


def parse_cmdline(cmdline: str) -> dict[str, dict[str, str]]:
    """cvm.repo_url=URL cvm.proxy=P cvm.job64=BASE64 on the kernel command line."""
    out: dict[str, dict[str, str]] = {}
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if not sep or not key.startswith("cvm."):
            continue
        if key == "cvm.repo_url":
            out.setdefault("repository", {})["url"] = value
        elif key == "cvm.proxy":
            out.setdefault("repository", {})["proxy"] = value
        elif key == "cvm.job64":
            try:
                command = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ContextError(f"kernel command line: cvm.job64 is not base64: {exc}") from exc
            out.setdefault("job", {})["command"] = command
    return out


def apply_overrides(settings: Settings, overrides: dict[str, dict[str, str]]) -> Settings:
    """User data changes the first repository (or adds one) and the job."""
    repo = overrides.get("repository", {})
    repos = list(settings.repositories)
    if repo:
        if repos:
            first = replace(repos[0], **repo)
            if "name" in repo and "mount_point" not in repo:
                first = replace(first, mount_point=f"/cvmfs/{repo['name']}")
            repos[0] = first
        else:
            if "url" not in repo:
                raise ContextError("user data adds a repository without a url")
            name = repo.get("name", "repository")
            fields = {"name": name, "mount_point": f"/cvmfs/{name}", **repo}
            repos.append(RepoSettings(**fields))
    job = overrides.get("job", {})
    copilot = settings.copilot
    if "copilot" in overrides:
        name = f"{settings.hostname}-{os.urandom(3).hex()}"  # volunteers' VMs share a hostname
        try:
            copilot = copilot_agent.config_from_user_data(
                overrides["copilot"], "user data", COPILOT_WORK, name
            )
        except copilot_agent.ConfigError as exc:
            raise ContextError(str(exc)) from None
    return replace(
        settings,
        repositories=repos,
        job=job.get("command", settings.job),
        then=job.get("then", settings.then),
        copilot=copilot,
    )


def fat_label(boot_sector: bytes) -> str | None:
    """The volume label of a FAT12/16/32 boot sector, or None if it is not FAT."""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        return None
    if boot_sector[82:90].startswith(b"FAT32"):
        return boot_sector[71:82].decode("ascii", "replace").strip()
    if boot_sector[54:62].startswith(b"FAT"):
        return boot_sector[43:54].decode("ascii", "replace").strip()
    return None


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


def fat_device(wanted: str) -> str | None:
    """The block device holding a FAT file system with this label."""
    for name in sorted(os.listdir("/sys/class/block")):
        try:
            with open(f"/dev/{name}", "rb") as device:
                label = fat_label(device.read(512))
        except OSError:
            continue
        if label is not None and label.upper() == wanted:
            return f"/dev/{name}"
    return None


def config_drive_user_data(job_dir: str) -> tuple[str, str] | None:
    """User data from the CIDATA drive; its input/ files are copied into job_dir
    while it is mounted."""
    device = fat_device("CIDATA")
    if device is None:
        return None
    os.makedirs("/run/cidata", exist_ok=True)
    _run(["mount", "-t", "vfat", "-o", "ro", device, "/run/cidata"])
    try:
        if os.path.isdir("/run/cidata/input"):
            copy_tree("/run/cidata/input", job_dir)
        try:
            with open("/run/cidata/user-data", encoding="utf-8") as f:
                return f.read(), f"config drive {device}"
        except FileNotFoundError:
            return None
    finally:
        subprocess.run(["umount", "/run/cidata"], check=False)


def copy_tree(source: str, target: str) -> None:
    """Contents only: a FAT target takes neither owners nor modes."""
    for root, _dirs, files in os.walk(source):
        into = os.path.join(target, os.path.relpath(root, source))
        os.makedirs(into, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(root, name), os.path.join(into, name))


def prepare_job_place() -> JobPlace:
    """vboxwrapper's shared folder, else the CVMOUT output disk, else a plain directory."""
    if os.path.exists("/dev/vboxguest"):
        os.makedirs(VBOX_MOUNT, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "vboxsf", VBOX_SHARE, VBOX_MOUNT],
                                 capture_output=True)  # fmt: skip
        if mounted.returncode == 0:
            return JobPlace(dir=VBOX_MOUNT, shared=VBOX_MOUNT)
    os.makedirs(JOB_DIR, exist_ok=True)
    device = fat_device(OUTPUT_LABEL)
    if device is None:
        return JobPlace()
    _run(["mount", "-t", "vfat", device, JOB_DIR])
    return JobPlace(output_device=device)


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

    def run(self) -> None:
        next_beat = 0.0
        while True:
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


def on_ec2() -> bool:
    for path, prefix in (
        ("/sys/class/dmi/id/sys_vendor", "Amazon EC2"),
        ("/sys/hypervisor/uuid", "ec2"),
    ):
        try:
            with open(path) as f:
                if f.read().strip().startswith(prefix):
                    return True
        except OSError:
            pass
    return False


IMDS = "http://169.254.169.254/latest"


def imds_user_data(base: str = IMDS) -> tuple[str, str] | None:
    """User data from EC2's instance metadata service, IMDSv2 (token first)."""
    token_request = urllib.request.Request(
        f"{base}/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    with urllib.request.urlopen(token_request, timeout=5) as response:
        token = response.read().decode()
    request = urllib.request.Request(
        f"{base}/user-data", headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode(), "EC2 instance metadata"
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def shared_user_data(place: JobPlace) -> tuple[str, str] | None:
    if place.shared is None:
        return None
    path = os.path.join(place.shared, "user-data")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except FileNotFoundError:
        return None


def contextualise(place: JobPlace) -> Settings:
    with open(SETTINGS_FILE, encoding="utf-8") as f:
        settings = settings_from_json(f.read())
    found = (
        shared_user_data(place)
        or config_drive_user_data(place.dir)
        or (imds_user_data() if on_ec2() else None)
    )
    if found is not None:
        text, source = found
        settings = apply_overrides(settings, parse_user_data(text, source))
        say(f"user data from {source}")
    with open("/proc/cmdline") as f:
        settings = apply_overrides(settings, parse_cmdline(f.read()))
    return settings


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
    cache = f"/var/lib/cvmfs-client/{repo.name}"
    command = ["cvmfs-client", "mount", repo.url, repo.mount_point, "--key", key_file,
               "--cache-dir", cache, "--quota", repo.cache_quota,
               "--proxy", repo.proxy]  # fmt: skip
    say(f"mounting {repo.url} at {repo.mount_point}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit {result.returncode}"
        try:
            with open(f"{cache}/client.log") as f:
                detail += " | " + " ".join(f.read().splitlines()[-3:])
        except OSError:
            pass
        raise ContextError(f"mounting {repo.name} failed: {detail}")
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


def stay() -> None:
    say("staying up")
    while True:
        try:
            os.wait()  # PID 1 reaps orphans
        except ChildProcessError:
            time.sleep(60)


def main() -> int:
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ.setdefault("HOME", "/root")
    os.environ.setdefault("LANG", "C.UTF-8")
    then = "poweroff"
    place: JobPlace | None = None
    try:
        early_mounts()
        say(f"agent started, uptime {open('/proc/uptime').read().split()[0]} s")
        place = prepare_job_place()
        liveness = Liveness(place)
        liveness.start()
        settings = contextualise(place)
        then = settings.then
        socket.sethostname(settings.hostname)
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
    if then == "stay" or os.getpid() != 1:
        if os.getpid() == 1:
            stay()
        return 0
    say("powering off")
    power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
