"""Serving through real web servers and proxies, and clients that keep their word when
things die: nginx serves the repository directory, squid keeps serving it with the origin
down, a mirror killed mid-read fails over, a killed client leaves a cache that verifies,
and an offline remount reads what was read before and fails fast on the rest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from repo_server.nginx import repository_server
from repo_server.repository import LocalRepository
from tests.conftest import (
    MiB,
    Nginx,
    Repo,
    Tree,
    client_daemon,
    free_port,
    mounted,
    read_files,
    run_cli,
    serving,
    serving_nginx,
    serving_process,
    stop,
    system_binary,
    wait_accepting,
    write_build_tree,
)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None,
    reason="needs /dev/fuse and fusermount (apt-get install fuse libfuse2)",
)

SW = "sw/1.0"  # where the generated release is published
BIG = "big/events.bin"  # 40 MiB of random bytes: about 30 chunks


# -- the release every test reads ------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    repo: Repo
    src: Path  # the build tree published at /sw/1.0
    files: Tree  # its regular files, relative to src
    big: bytes  # the content of /big/events.bin


def add_program(src: Path) -> None:
    """A Python program with its package, symlinks to both, and a few distinct modes."""
    (src / "python" / "physics").mkdir(parents=True)
    (src / "python" / "physics" / "__init__.py").write_text("def z_mass():\n    return 91.19\n")
    (src / "bin").mkdir()
    program = src / "bin" / "analyse.py"
    program.write_text("import physics\nprint('Z mass', physics.z_mass())\n")
    program.chmod(0o755)
    (src / "bin" / "README").write_text("read-only\n")
    (src / "bin" / "README").chmod(0o444)
    os.symlink("analyse.py", src / "bin" / "latest")
    os.symlink("python/physics", src / "physics-link")
    os.symlink("../nowhere", src / "bin" / "dangling")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    base = tmp_path_factory.mktemp("release")
    LocalRepository.init(base / "repo", "sw.example.org")
    repo = Repo(base / "repo", base / "repo.keys", "sw.example.org")
    src = base / "src"
    write_build_tree(src, seed=11, small_files=240, big_files=2, big_size=3 * MiB)
    add_program(src)
    big = os.urandom(40 * MiB)
    (base / "big").mkdir()
    (base / "big" / "events.bin").write_bytes(big)
    env = {"CVMBUILD_CACHE_DIR": str(base / "statcache")}
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", f"/{SW}", env=env)
    run_cli("cvmbuild", "publish", base / "big", "--repo", repo.dir, "--path", "/big", env=env)
    return Release(repo, src, read_files(src), big)


def differences(src: Path, mounted: Path) -> list[str]:
    """What differs between a build tree and its mounted copy: names, modes, mtimes,
    symlink targets, contents."""
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        if sorted(os.listdir(mounted / rel)) != sorted(dirnames + filenames):
            found.append(f"{rel}: listing differs")
        for name in dirnames + filenames:
            a, b = Path(dirpath) / name, mounted / rel / name
            st_a, st_b = a.lstat(), b.lstat()
            if (st_a.st_mode, st_a.st_mtime_ns) != (st_b.st_mode, st_b.st_mtime_ns):
                found.append(f"{rel / name}: mode or mtime differs")
            elif a.is_symlink():
                if os.readlink(a) != os.readlink(b):
                    found.append(f"{rel / name}: symlink target differs")
            elif a.is_file() and a.read_bytes() != b.read_bytes():
                found.append(f"{rel / name}: content differs")
    return found


# -- mounts ----------------------------------------------------------------------------------


def client_stat(mountpoint: Path) -> dict[str, str]:
    out = run_cli("cvmfs-client", "stat", mountpoint).stdout.decode()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture
def nginx(release: Release, tmp_path: Path) -> Iterator[Nginx]:
    """nginx serving the repository directory as plain static files."""
    with serving_nginx(release.repo.dir, tmp_path / "nginx") as server:
        yield server


@dataclass
class Squid:
    url: str
    access_log: Path

    def log_lines(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return self.access_log.read_text().splitlines()
        return []


SQUID_CONF = """\
http_port 127.0.0.1:{port}
pid_filename {work}/squid.pid
{user}
cache_mem 256 MB
maximum_object_size_in_memory 16 MB
access_log stdio:{work}/logs/access.log
cache_log {work}/logs/cache.log
cache_store_log none
coredump_dir {work}/spool
pinger_enable off
shutdown_lifetime 0 seconds
http_access allow localhost
http_access deny all
"""


@pytest.fixture
def squid() -> Iterator[Squid]:
    """A real squid on loopback with a memory cache, under its own service name."""
    binary = system_binary("squid")
    name = f"cvmfstest{os.getpid()}x{secrets.token_hex(4)}"  # alphanumeric only
    # squid drops to the proxy user, which cannot enter pytest's private tmp tree.
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    work.chmod(0o755)
    as_root = os.geteuid() == 0  # as root, squid runs here only as the proxy user
    for sub in ("logs", "spool"):
        (work / sub).mkdir()
        if as_root:
            shutil.chown(work / sub, "proxy", "proxy")
    port = free_port()
    conf = work / "squid.conf"
    user = "cache_effective_user proxy" if as_root else ""
    conf.write_text(SQUID_CONF.format(port=port, work=work, user=user))
    log = work / "stderr"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, "-n", name, "-N", "-f", conf],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_accepting("squid", port, proc, log)
        yield Squid(f"http://127.0.0.1:{port}", work / "logs" / "access.log")
    finally:
        if proc is not None:
            stop(proc)
        for segment in Path("/dev/shm").glob(f"{name}-*"):  # squid leaves them behind
            segment.unlink()
        shutil.rmtree(work, ignore_errors=True)


# -- the stories -----------------------------------------------------------------------------


def test_a_release_mounted_through_nginx_is_identical_and_runs(
    release: Release, nginx: Nginx, tmp_path: Path
) -> None:
    with mounted(nginx.url, tmp_path / "mnt", tmp_path / "cache", release.repo.pub) as mnt:
        base = mnt / SW
        assert differences(release.src, base) == []
        out = subprocess.run(
            [sys.executable, str(base / "bin" / "latest")],
            env={**os.environ, "PYTHONPATH": str(base / "python")},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout == "Z mass 91.19\n"
        stat = client_stat(mnt)
        assert stat["host"] == nginx.url and stat["proxy"] == "DIRECT"
        assert stat["io_errors"] == "0"
    assert " 200 " in nginx.access_log.read_text()  # nginx, not something else, served it


def test_a_second_client_reads_everything_from_squid_after_the_origin_stopped(
    release: Release, nginx: Nginx, squid: Squid, tmp_path: Path
) -> None:
    key = release.repo.pub
    with mounted(nginx.url, tmp_path / "a", tmp_path / "cache-a", key, "--proxy", squid.url) as a:
        assert read_files(a / SW) == release.files
        assert client_stat(a)["proxy"] == squid.url
    nginx.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{nginx.url}/manifest", timeout=5)
    seen = len(squid.log_lines())

    with mounted(nginx.url, tmp_path / "b", tmp_path / "cache-b", key, "--proxy", squid.url) as b:
        assert read_files(b / SW) == release.files
        stat = client_stat(b)
        assert stat["offline"] == "False"  # a fresh manifest, through squid
        assert stat["proxy"] == squid.url and stat["io_errors"] == "0"
        fetched = int(stat["misses"]) + 2  # every object, plus whitelist and manifest

    deadline = time.monotonic() + 10
    while len(squid.log_lines()) - seen < fetched:  # squid logs as each reply ends
        assert time.monotonic() < deadline, squid.log_lines()[seen:]
        time.sleep(0.1)
    statuses = [line.split()[3] for line in squid.log_lines()[seen:]]
    assert statuses and all(s in ("TCP_MEM_HIT/200", "TCP_HIT/200") for s in statuses), statuses


def test_reading_a_large_file_fails_over_when_its_mirror_is_killed_mid_read(
    release: Release, nginx: Nginx, tmp_path: Path
) -> None:
    with serving_process(release.repo.dir, tmp_path / "mirror1.log") as (first, server):
        mirrors = f"{first};{nginx.url}"
        with mounted(mirrors, tmp_path / "mnt", tmp_path / "cache", release.repo.pub) as mnt:
            assert client_stat(mnt)["host"] == first
            chunks = int(os.getxattr(mnt / BIG, "user.chunks"))
            assert chunks >= 20
            with open(mnt / BIG, "rb") as f:
                head = f.read(8 * MiB)
                server.send_signal(signal.SIGKILL)
                server.wait()
                rest = f.read()
            assert head + rest == release.big
            stat = client_stat(mnt)
            assert stat["io_errors"] == "0"
            assert stat["host"] == nginx.url
            assert int(stat["fetch_failures"]) > 0  # the failover is visible to operators
        assert "trying the next mirror or proxy" in (tmp_path / "cache" / "client.log").read_text()
    # The first mirror served the start of the file, the second the rest.
    from_second = nginx.access_log.read_text().count('"GET /data/')
    assert 0 < from_second < chunks


def test_a_client_killed_while_downloading_leaves_a_cache_that_verifies(
    release: Release, tmp_path: Path
) -> None:
    cache, mountpoint = tmp_path / "cache", tmp_path / "mnt"
    with serving(release.repo.dir, tmp_path / "serve.log") as url:
        progress: list[int] = []
        failure: list[OSError] = []

        def read_big() -> None:
            try:
                with open(mountpoint / BIG, "rb") as f:
                    while block := f.read(MiB):
                        progress.append(len(block))
            except OSError as exc:
                failure.append(exc)

        with mounted(url, mountpoint, cache, release.repo.pub):
            daemon = client_daemon(mountpoint)
            assert daemon is not None
            reader = threading.Thread(target=read_big)
            reader.start()
            deadline = time.monotonic() + 30
            while sum(progress) < 6 * MiB:
                assert time.monotonic() < deadline and reader.is_alive(), progress
                time.sleep(0.005)
            os.kill(daemon, signal.SIGKILL)
            reader.join(timeout=30)
            assert failure, "the download finished before the client was killed"
            assert failure[0].errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
        # The kill rarely lands inside a cache write (they are short); leave what one
        # would: the first half of a chunk, in the cache's temporary directory.
        (cache / "objects" / "tmp" / "5eed1e55c0ffee00").write_bytes(release.big[: MiB // 2])

        with mounted(url, mountpoint, cache, release.repo.pub) as mnt:
            assert os.listdir(cache / "objects" / "tmp") == []  # left-overs removed
            assert (mnt / BIG).read_bytes() == release.big
            assert read_files(mnt / SW) == release.files
            assert client_stat(mnt)["io_errors"] == "0"

    verify = run_cli("cvmfs-client", "cache", "verify", "--cache-dir", cache).stdout.decode()
    assert verify.rstrip().endswith(" 0 removed"), verify
    assert "removed corrupt entry" not in verify


def test_an_offline_remount_reads_what_was_read_and_fails_fast_on_the_rest(
    release: Release, nginx: Nginx, tmp_path: Path
) -> None:
    cache, mountpoint = tmp_path / "cache", tmp_path / "mnt"
    never_read = "data/calib1.bin"
    read_before = {k: v for k, v in release.files.items() if k != never_read}
    with serving(release.repo.dir, tmp_path / "serve.log") as url:
        mirrors = f"{url};{nginx.url}"
        # --no-prefetch: the cache must hold exactly what was read, not never_read too.
        with mounted(mirrors, mountpoint, cache, release.repo.pub, "--no-prefetch") as mnt:
            for relpath, content in read_before.items():
                assert (mnt / SW / relpath).read_bytes() == content, relpath
            assert (mnt / SW / never_read).stat().st_size == len(release.files[never_read])
    nginx.stop()

    with mounted(mirrors, mountpoint, cache, release.repo.pub) as mnt:
        assert client_stat(mnt)["offline"] == "True"
        assert differences(release.src / "bin", mnt / SW / "bin") == []
        for relpath, content in read_before.items():
            assert (mnt / SW / relpath).read_bytes() == content, relpath
        start = time.monotonic()
        with pytest.raises(OSError) as failure:
            (mnt / SW / never_read).read_bytes()
        assert failure.value.errno == errno.EIO
        assert time.monotonic() - start < 30, "an unreachable object must fail, not hang"
        assert client_stat(mnt)["io_errors"] != "0"


def test_the_documented_nginx_configuration_is_the_one_these_tests_run() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "OPERATING.md").read_text()
    documented = re.search(r"```nginx\n(.*?)```", docs, re.S)
    assert documented is not None, "docs/OPERATING.md lost its nginx block"
    assert documented.group(1) == repository_server("/srv/repo", "80")
