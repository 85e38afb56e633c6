"""Session fixtures for the tests that need a built appliance: one `cvmbuild export`
of the default recipe in every format (shared by test_appliance.py and the BOINC
tests), the recipe's repository served on the loopback, and a moto server for `ami`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cvmbuild.appliance import boot
from tests.conftest import BIN, free_port, run_cli, serving

ROOT = Path(__file__).resolve().parent.parent
THIN = ROOT / "recipes" / "thin.toml"
ALL_FORMATS = ["raw", "qcow2", "vdi", "vmdk", "ova", "hdd", "vhd", "ami", "boinc"]


def needs_build_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("building an appliance needs root (mmdebstrap --mode=root)")
    missing = [t for t in ("mmdebstrap", "mksquashfs", "qemu-img", "syslinux", "mcopy")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        pytest.fail(f"missing tools {missing}: run.sh installs them (SYSTEM_PACKAGES)")


@dataclass
class Served:
    url: str  # as the guest sees it, through QEMU's user network
    key: Path

    def user_data(self, job: str) -> str:
        """Guest user data that mounts this repository and runs job."""
        return boot.user_data(self.url, self.key.read_text(), None, job)


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The recipe's repository (sw.example.org) with a small program at /sw/hello/1.0,
    served on the loopback."""
    base = tmp_path_factory.mktemp("appliance-repo")
    src = base / "hello"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "hello.py").write_text(
        "import platform\nprint('hello from the repository on', platform.node())\n"
    )
    env = {"CVMBUILD_CACHE_DIR": str(base / "statcache")}
    run_cli("repo-server", "init", base / "repo", "--name", "sw.example.org")
    run_cli("cvmbuild", "publish", src, "--repo", base / "repo", "--path", "/sw/hello/1.0", env=env)
    with serving(base / "repo", base / "serve.log") as url:
        port = url.rsplit(":", 1)[1]
        yield Served(f"http://10.0.2.2:{port}", base / "repo.keys" / "sw.example.org.pub")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{url}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@dataclass
class Built:
    dir: Path
    stderr: str
    stdout: str
    seconds: float

    def image(self, fmt: str) -> Path:
        name = {"ami": "cvm-thin.ami.json"}.get(fmt, f"cvm-thin.{fmt}")
        return self.dir / name


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Built:
    """`cvmbuild export` of the default recipe in every format, once."""
    needs_build_host()
    out = tmp_path_factory.mktemp("appliance")
    started = time.monotonic()
    result = run_cli(
        "cvmbuild", "export", "--recipe", THIN, "--format", ",".join(ALL_FORMATS),
        "--output", out, "--endpoint-url", moto_endpoint, env=AWS_ENV, timeout=1500,
    )  # fmt: skip
    return Built(out, result.stderr.decode(), result.stdout.decode(), time.monotonic() - started)


@pytest.fixture(scope="session")
def thin_qcow2(built: Built) -> Path:
    """The default recipe as qcow2, from the one session build."""
    return built.image("qcow2")
