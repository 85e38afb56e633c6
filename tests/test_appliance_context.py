"""The built appliance, booted the ways a cloud user and a site admin boot it: with a
`cloud-localds` NoCloud seed, an OpenStack config drive, a repository under another
name than configured, a job that needs x86-64-v2, and a persistent cache disk that
serves a second boot with the repository's server stopped.

Every test here boots QEMU (software emulation on this machine): they share the one
session build (`built`) and boot as few times as the story needs.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance_fixtures import Built, Served
from tests.conftest import BIN, free_port, run_cli, serving

pytestmark = pytest.mark.slow
HELLO = "/cvmfs/sw.example.org/sw/hello/1.0/bin/hello.py"


def indented(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())


@pytest.fixture(scope="module")
def acc_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A second repository, acc.test, with one data file, served on the loopback."""
    base = tmp_path_factory.mktemp("acc-repo")
    (base / "src").mkdir()
    (base / "src" / "README").write_text("acc.test data, revision 1\n")
    env = {"CVMBUILD_CACHE_DIR": str(base / "statcache")}
    run_cli("repo-server", "init", base / "repo", "--name", "acc.test")
    run_cli("cvmbuild", "publish", base / "src", "--repo", base / "repo", "--path", "/data",
            env=env)  # fmt: skip
    with serving(base / "repo", base / "serve.log") as url:
        yield Served(
            f"http://10.0.2.2:{url.rsplit(':', 1)[1]}", base / "repo.keys" / "acc.test.pub"
        )


def boot(image: Path, *args: str | Path, console: Path, timeout: int = 400) -> tuple[int, str, str]:
    """`cvmbuild boot`: exit status, stdout, and the console log and stderr together."""
    result = run_cli("cvmbuild", "boot", image, *args, "--timeout", str(timeout),
                     "--console-log", console, check=False, timeout=timeout + 120)  # fmt: skip
    log = console.read_text() if console.exists() else ""
    return result.returncode, result.stdout.decode(), result.stderr.decode() + log


def test_a_cloud_localds_seed_mounts_two_repositories_under_their_names_and_runs_runcmd(
    built: Built, served_repository: Served, acc_repository: Served, tmp_path: Path
) -> None:
    if shutil.which("cloud-localds") is None:
        pytest.fail("cloud-localds is missing: run.sh installs cloud-image-utils")
    (tmp_path / "user-data").write_text(
        "#cloud-config\n"
        "hostname: seeded-node\n"
        "cvmfs:\n"
        "  repositories:\n"
        f"    - name: sw.example.org\n      url: {served_repository.url}\n"
        f"    - name: acc.test\n      url: {acc_repository.url}\n"
        "  keys:\n"
        f"    sw.example.org: |\n{indented(served_repository.key.read_text(), 6)}"
        f"    acc.test: |\n{indented(acc_repository.key.read_text(), 6)}"
        "write_files:\n"
        '  - path: /etc/greeting\n    content: "written by cloud-config\\n"\n'
        "runcmd:\n"
        "  - cat /cvmfs/acc.test/data/README\n"
        f"  - python3 {HELLO}\n"
        "  - [cat, /etc/greeting]\n"
    )
    (tmp_path / "meta-data").write_text(
        "instance-id: i-0001\nlocal-hostname: ignored-by-user-data\n"
    )
    seed = tmp_path / "seed.iso"
    subprocess.run(["cloud-localds", seed, tmp_path / "user-data", tmp_path / "meta-data"],
                   check=True)  # fmt: skip
    status, out, log = boot(
        built.image("qcow2"), "--seed", seed, "--accel", "tcg", console=tmp_path / "c.log"
    )
    assert status == 0, log[-4000:]
    assert "user data from NoCloud drive" in log and "(iso9660, label cidata): #cloud-config" in log
    assert "keys hostname, cvmfs, write_files, runcmd" in log
    assert "mounted sw.example.org revision 1 at /cvmfs/sw.example.org" in log
    assert "mounted acc.test revision 1 at /cvmfs/acc.test" in log
    job = [line.strip() for line in out.splitlines() if line.startswith("| ")]
    assert "| acc.test data, revision 1" in job
    assert "| hello from the repository on seeded-node" in job
    assert "| written by cloud-config" in job


def test_an_openstack_config_drive_gives_user_data_and_meta_data(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    if shutil.which("genisoimage") is None:
        pytest.fail("genisoimage is missing: run.sh installs it")
    latest = tmp_path / "drive" / "openstack" / "latest"
    latest.mkdir(parents=True)
    (latest / "meta_data.json").write_text(json.dumps({"uuid": "u-1", "hostname": "from-nova"}))
    (latest / "user_data").write_text(
        "#cloud-config\n"
        "cvmfs:\n"
        f"  server_url: {served_repository.url}\n"
        f"  keys:\n    sw.example.org: |\n{indented(served_repository.key.read_text(), 6)}"
        f"runcmd:\n  - python3 {HELLO}\n"
    )
    drive = tmp_path / "config-2.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", drive, "-V", "config-2", "-r", "-J",
                    tmp_path / "drive"], check=True)  # fmt: skip
    status, out, log = boot(
        built.image("qcow2"), "--seed", drive, "--accel", "tcg", console=tmp_path / "c.log"
    )
    assert status == 0, log[-4000:]
    assert "user data from config drive" in log and "(iso9660, label config-2)" in log
    assert "| hello from the repository on from-nova" in out


def test_a_repository_serving_another_name_than_configured_is_refused(
    built: Built, acc_repository: Served, tmp_path: Path
) -> None:
    """The recipe names sw.example.org; URL and key are acc.test's: nothing is mounted
    under the wrong name, the console says why and the boot fails."""
    status, out, log = boot(
        built.image("qcow2"), "--repo-url", acc_repository.url, "--repo-key", acc_repository.key,
        "--job", "ls /cvmfs/sw.example.org", "--accel", "tcg", console=tmp_path / "c.log",
    )  # fmt: skip
    assert status == 1
    assert "error: sw.example.org not mounted at /cvmfs/sw.example.org" in log
    assert "serves repository 'acc.test', not 'sw.example.org'" in log
    assert "mounted acc.test" not in log and "job start" not in log


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill `cvmbuild boot` and whatever it started (it runs in its own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


X86_64_V2 = """
import ctypes, mmap
# popcnt rax, rdi; ret  |  xor eax, eax; crc32 rax, rdi (SSE4.2); ret
code = {"popcnt": "f3480fb8c7c3", "crc32": "31c0f2480f38f1c7c3"}
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
for i, (name, hexcode) in enumerate(code.items()):
    page.seek(i * 64)
    page.write(bytes.fromhex(hexcode))
    address = ctypes.addressof(ctypes.c_char.from_buffer(page, i * 64))
    print(name, ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)(0xFF00FF))
"""
SERVE_ONCE = """
import http.server
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"from the guest")
server = http.server.HTTPServer(("", 8080), Hello)
server.timeout = 180
server.handle_request()
# The appliance powers off as soon as the job ends, and QEMU's user network may not
# have passed the answer on to the host yet (a CI run at 319b04e got an empty body).
import time
time.sleep(5)
"""


def test_a_named_repository_and_a_job_needing_x86_64_v2_with_two_cpus_and_a_forward(
    built: Built, acc_repository: Served, tmp_path: Path
) -> None:
    """Under `cvmbuild boot`'s defaults, POPCNT and SSE4.2's CRC32 execute (QEMU's own
    qemu64 model raises #UD: numpy 2.4 dies with SIGILL); --repo-name mounts acc.test at
    /cvmfs/acc.test; --cpus 2 gives two CPUs and --forward reaches a guest port."""
    script = (
        "grep -qw popcnt /proc/cpuinfo && grep -qw sse4_2 /proc/cpuinfo && echo cpu flags ok\n"
        "cat /cvmfs/acc.test/data/README\n"
        "echo cpus $(nproc)\n"
        f"python3 - <<'END'\n{X86_64_V2}END\n"
        f"python3 - <<'END'\n{SERVE_ONCE}END\n"
    )
    packed = base64.b64encode(script.encode()).decode()
    job = f"echo {packed} | base64 -d > /tmp/job.sh; sh /tmp/job.sh"
    port = free_port()
    console = tmp_path / "c.log"
    command: list[str | Path] = [
        BIN / "cvmbuild", "boot", built.image("qcow2"), "--repo-url", acc_repository.url,
        "--repo-key", acc_repository.key, "--repo-name", "acc.test", "--job", job,
        "--cpus", "2", "--forward", f"{port}:8080", "--timeout", "400", "--console-log", console,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        body = b""
        deadline = time.monotonic() + 400
        while not body and proc.poll() is None and time.monotonic() < deadline:
            try:
                # Not given up after a few seconds: the guest answers once, and under
                # TCG its answer may come late to a request already sent.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
                    body = response.read()
            except OSError:  # QEMU not listening yet, or the guest's server not yet up
                time.sleep(1)
        out, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    log = console.read_text() if console.exists() else ""
    assert proc.returncode == 0, (err.decode(), log[-4000:])
    assert body == b"from the guest"
    assert "mounted acc.test revision 1 at /cvmfs/acc.test" in log
    lines = out.decode().splitlines()
    assert "| acc.test data, revision 1" in lines
    assert "| cpu flags ok" in lines and "| popcnt 16" in lines and "| cpus 2" in lines
    assert any(line.startswith("| crc32 ") for line in lines)


def test_a_cache_disk_serves_a_second_boot_without_the_server(built: Built, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.txt").write_text("read once, cached on disk\n")
    env = {"CVMBUILD_CACHE_DIR": str(tmp_path / "statcache")}
    run_cli("repo-server", "init", tmp_path / "repo", "--name", "sw.example.org")
    run_cli("cvmbuild", "publish", src, "--repo", tmp_path / "repo", "--path", "/data", env=env)
    key = tmp_path / "repo.keys" / "sw.example.org.pub"
    cache = tmp_path / "cache.qcow2"
    job: list[str | Path] = [
        "--job",
        "cat /cvmfs/sw.example.org/data/data.txt",
        "--cache-disk",
        cache,
    ]
    with serving(tmp_path / "repo", tmp_path / "serve.log") as url:
        guest_url = f"http://10.0.2.2:{url.rsplit(':', 1)[1]}"
        status, out, log = boot(built.image("qcow2"), "--repo-url", guest_url, "--repo-key", key,
                                *job, console=tmp_path / "first.log")  # fmt: skip
        assert status == 0, log[-4000:]
        assert "formatting it ext4 (label CVMCACHE)" in log
    assert "| read once, cached on disk" in out.splitlines()
    status, out, log = boot(built.image("qcow2"), "--repo-url", guest_url, "--repo-key", key,
                            *job, console=tmp_path / "second.log")  # fmt: skip
    assert status == 0, log[-4000:]
    assert "reused" in log and "formatting" not in log
    assert "| read once, cached on disk" in out.splitlines()


def read_until(fd: int, wanted: bytes, seen: bytearray, deadline: float) -> None:
    """Read a terminal until wanted appears in everything seen so far."""
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {wanted!r} on the console; last: {bytes(seen[-2000:])!r}"
        ready, _, _ = select.select([fd], [], [], min(remaining, 5))
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: cvmbuild boot closed the terminal
                chunk = b""
            assert chunk, f"the console closed before {wanted!r}; last: {bytes(seen[-2000:])!r}"
            seen += chunk


def test_shell_gives_a_root_shell_on_the_console_after_the_job(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    """`cvmbuild boot --shell` on a terminal: the boot, the job, then a shell; `exit`
    powers the appliance off and cvmbuild boot exits 0. (With the default --accel auto:
    where KVM fails, as on our CI machine, the shell comes up under TCG.)"""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [BIN / "cvmbuild", "boot", built.image("qcow2"), "--shell",
         "--repo-url", served_repository.url, "--repo-key", served_repository.key,
         "--job", "echo the job ran"],
        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = bytearray()
    try:
        deadline = time.monotonic() + 400
        read_until(controller, b"shell on the console", seen, deadline)
        read_until(controller, b"root@cvm-thin:/# ", seen, deadline)
        os.write(controller, b"echo $((6 * 7))-from-$(hostname)\r")
        read_until(controller, b"42-from-cvm-thin", seen, deadline)
        os.write(controller, b"exit\r")
        assert proc.wait(timeout=120) == 0
    finally:
        stop(proc)
        os.close(controller)
    assert b"the job ran" in seen and b"mounted sw.example.org" in seen
