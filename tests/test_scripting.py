"""The programs in scripts and CI: --version, --json documents a script parses, exit
codes (cache verify's 3), a quiet exit into `| head`, progress lines in logs without a
terminal, and a server that binds its port before it says it serves."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import socket
import struct
import subprocess
import termios
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    MiB,
    Repo,
    free_port,
    mounted,
    publish,
    run_cli,
    serving,
    write_build_tree,
)

NOW_AND_EVERY_UPDATE = {"CVMFS_PROGRESS_INTERVAL": "0"}


def as_json(result: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


@pytest.fixture
def release(tmp_path: Path) -> Path:
    src = tmp_path / "release"
    write_build_tree(src, seed=13, small_files=150, big_files=1, big_size=5 * MiB)
    return src


# -- --version ---------------------------------------------------------------------------


def test_every_program_prints_the_product_version() -> None:
    version = metadata.version("cvmfs-py")
    for program in ("cvmbuild", "repo-server", "cvmfs-client", "copilot-manager"):
        assert run_cli(program, "--version").stdout.decode() == f"{program} {version}\n"


# -- --json ------------------------------------------------------------------------------


def test_reports_as_json_documents(repo: Repo, release: Path, tmp_path: Path) -> None:
    first = as_json(
        run_cli(
            "cvmbuild",
            "publish",
            release,
            "--repo",
            repo.dir,
            "--path",
            "/sw/1.0",
            "--tag",
            "v1",
            "--json",
        )  # fmt: skip
    )
    assert first["revision"] == 1 and first["path"] == "/sw/1.0" and first["dry_run"] is False
    files = [p for p in release.rglob("*") if p.is_file()]
    assert first["files"] == len(files)
    assert first["bytes"] == sum(p.stat().st_size for p in files)
    (release / "NEWS").write_text("second\n")
    dry = as_json(
        run_cli(
            "cvmbuild",
            "publish",
            release,
            "--repo",
            repo.dir,
            "--path",
            "/sw/1.0",
            "--dry-run",
            "--json",
        )  # fmt: skip
    )
    assert dry["dry_run"] is True and dry["revision"] is None
    run_cli("cvmbuild", "publish", release, "--repo", repo.dir, "--path", "/sw/1.0")

    info = as_json(run_cli("repo-server", "info", repo.dir, "--json"))
    assert info["name"] == repo.name and info["revision"] == 2
    assert info["files"] == len(files) + 1 and str(info["whitelist_expires"]).endswith("Z")

    check = as_json(run_cli("repo-server", "check", repo.dir, "--json"))
    assert check["ok"] is True and check["revisions"] == [1, 2] and check["problems"] == []

    tags = as_json(run_cli("repo-server", "tags", repo.dir, "--json"))
    assert [(t["name"], t["revision"]) for t in tags["tags"]] == [("v1", 1)]  # type: ignore[index, union-attr]

    diff = as_json(run_cli("repo-server", "diff", repo.dir, "v1", "2", "--json"))
    assert diff["from"] == 1 and diff["to"] == 2
    assert diff["changes"] == [{"change": "added", "path": "/sw/1.0/NEWS"}]

    run_cli("repo-server", "token", "add", repo.dir, "--name", "ci", "--path", "/sw")
    tokens = as_json(run_cli("repo-server", "token", "list", repo.dir, "--json"))
    assert [(t["name"], t["path"]) for t in tokens["tokens"]] == [("ci", "/sw")]  # type: ignore[index, union-attr]


def test_check_json_lists_the_problems_and_exits_1(repo: Repo, release: Path) -> None:
    publish(release, repo, "/sw/1.0")
    victim = next(p for p in (repo.dir / "data").rglob("*") if p.is_file())
    victim.unlink()
    result = run_cli("repo-server", "check", repo.dir, "--json", check=False)
    assert result.returncode == 1
    report = as_json(result)
    assert report["ok"] is False and report["problems"]


def test_stat_of_a_mount_as_json(repo: Repo, release: Path, tmp_path: Path) -> None:
    publish(release, repo, "/sw/1.0")
    with mounted(str(repo.dir), tmp_path / "mnt", tmp_path / "cache", repo.pub) as mnt:
        assert (mnt / "sw/1.0/lib000/mod0.py").read_bytes() == (
            release / "lib000/mod0.py"
        ).read_bytes()
        stats = as_json(run_cli("cvmfs-client", "stat", mnt, "--json"))
    assert stats["revision"] == 1 and isinstance(stats["cache_bytes"], int)


# -- exit codes --------------------------------------------------------------------------


def test_cache_verify_exits_3_after_removing_corruption(
    repo: Repo, release: Path, tmp_path: Path
) -> None:
    publish(release, repo, "/sw/1.0")
    base = tmp_path / "caches"
    config = tmp_path / "client.conf"
    config.write_text(f"CVMFS_CACHE_BASE={base}\nCVMFS_PUBLIC_KEY={repo.pub}\n")
    cache = base / repo.name  # where a mount with this config keeps its cache
    run_cli("cvmfs-client", "preload", repo.dir, cache, "--key", repo.pub)

    clean = run_cli("cvmfs-client", "cache", "verify", "--config", config)
    assert b", 0 removed" in clean.stdout
    entry = next(p for p in (cache / "objects").glob("??/*") if p.is_file())
    entry.write_bytes(b"bit rot")
    found = run_cli("cvmfs-client", "cache", "verify", "--config", config, check=False)
    assert found.returncode == 3, found.stderr
    assert f"removed corrupt entry {entry.parent.name}{entry.name}".encode() in found.stdout
    again = run_cli("cvmfs-client", "cache", "verify", "--cache-dir", cache)
    assert again.returncode == 0


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in root.rglob("*")
    }


def test_cache_commands_refuse_what_is_not_a_cache(tmp_path: Path) -> None:
    # A git directory also has objects/ with two-letter folders: a typo away.
    git = tmp_path / "project.git"
    for name in ("objects/ab/cdef0123", "objects/pack/pack-1.idx", "objects/info/packs", "HEAD"):
        (git / name).parent.mkdir(parents=True, exist_ok=True)
        (git / name).write_bytes(b"keep me")
    before = snapshot(git)
    for action in ("verify", "clean"):
        for where in (git, tmp_path / "missing"):
            result = run_cli("cvmfs-client", "cache", action, "--cache-dir", where, check=False)
            assert result.returncode == 1
            assert result.stderr.decode() == (
                f"error: {where}: not a cvmfs-client cache (left untouched); give the "
                "--cache-dir a mount or preload used\n"
            )
    assert snapshot(git) == before and not (tmp_path / "missing").exists()


def test_output_into_a_closed_pipe_ends_quietly(repo: Repo, tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(6000):  # a listing far larger than a pipe's buffer
        (many / f"a-file-with-a-long-name-{i:05d}").touch()
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(4 * MiB))
    publish(many, repo, "/sw/many")
    publish(big, repo, "/sw/big")
    for command in (
        f"{BIN}/repo-server diff {repo.dir} 0 1",
        f"{BIN}/cvmfs-client ls {repo.dir} /sw/many --key {repo.pub}",
        f"{BIN}/cvmfs-client cat {repo.dir} /sw/big/blob --key {repo.pub}",
    ):
        result = subprocess.run(
            ["bash", "-c", f"{command} 2>{tmp_path}/stderr | head -c 10 >/dev/null; "
             "echo ${PIPESTATUS[0]}"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        assert (tmp_path / "stderr").read_bytes() == b"", command
        assert result.stdout == b"141\n", command  # as if killed by SIGPIPE, like cat


def test_serve_on_a_port_in_use_is_one_error_line(repo: Repo) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "repo-server", "serve", repo.dir, "--listen", f"127.0.0.1:{port}", check=False,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"error: --listen 127.0.0.1:{port}: cannot listen there (Address already in use); "
        "stop what uses the port or choose another\n"
    )


# -- progress ----------------------------------------------------------------------------


def progress_lines(stderr: bytes, what: str) -> list[str]:
    return [line for line in stderr.decode().splitlines() if line.startswith(f"{what}: ")]


def test_long_work_reports_progress_in_a_log(repo: Repo, release: Path, tmp_path: Path) -> None:
    env = NOW_AND_EVERY_UPDATE
    published = run_cli(
        "cvmbuild", "publish", release, "--repo", repo.dir, "--path", "/sw/1.0", env=env
    )
    lines = progress_lines(published.stderr, "publishing")
    assert lines and "MiB of " in lines[-1] and lines[-1].endswith(" s")
    assert "(100%)" in lines[-1]

    checked = run_cli("repo-server", "check", repo.dir, env=env)
    assert progress_lines(checked.stderr, "checking")[-1].startswith("checking: ")
    assert " objects (100%)" in progress_lines(checked.stderr, "checking")[-1]

    preloaded = run_cli(
        "cvmfs-client", "preload", repo.dir, tmp_path / "cache", "--key", repo.pub, env=env
    )
    assert "(100%)" in progress_lines(preloaded.stderr, "preloading")[-1]

    with serving(repo.dir, tmp_path / "serve.log") as url:
        mirrored = run_cli(
            "repo-server", "replicate", url, tmp_path / "mirror", "--key", repo.pub,
            "--workers", "1", env=env,
        )  # fmt: skip
    assert " objects (100%)" in progress_lines(mirrored.stderr, "replicating revision 1")[-1]

    quiet = run_cli("repo-server", "check", repo.dir)  # every 5 s by default: none here
    assert progress_lines(quiet.stderr, "checking") == []


def test_a_terminal_gets_a_progress_bar(repo: Repo, release: Path) -> None:
    leader, follower = pty.openpty()
    # A terminal 80 columns wide (a new pty is 0 by 0, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        proc = subprocess.Popen(
            [BIN / "cvmbuild", "publish", release, "--repo", repo.dir, "--path", "/sw/1.0"],
            stdout=subprocess.PIPE, stderr=follower, env={**os.environ, **NOW_AND_EVERY_UPDATE},
        )  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the publisher closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(leader)
    assert b"publishing:" in seen and b"%|" in seen  # tqdm's bar, redrawn in place
    assert b"MiB of " not in seen  # no plain log lines on a terminal
