"""A publish killed with SIGKILL at any moment leaves the previous revision intact.

The story: a build machine dies in the middle of `cvmbuild publish`. The operator's
`repo-server check` is still green, clients still read the previous release byte for
byte, and running the same publish again finishes the job.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo_server.repository import LocalRepository
from tests.conftest import BIN, MiB, Repo, Tree, open_reader, read_tree, run_cli, write_build_tree

TRIALS = 20


@dataclass(frozen=True)
class Release:
    src: Path
    tree: Tree
    publish_seconds: float  # wall time of one uninterrupted publish into a fresh repository


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tree]:
    src = tmp_path_factory.mktemp("release-1.0")
    return src, write_build_tree(src, seed=1, small_files=60, big_files=1, big_size=5 * MiB)


@pytest.fixture(scope="module")
def next_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    src = tmp_path_factory.mktemp("release-2.0")
    tree = write_build_tree(src, seed=2, small_files=2500, big_files=3)
    scratch = tmp_path_factory.mktemp("timing")
    LocalRepository.init(scratch / "repo", "timing.example.org")
    start = time.monotonic()
    run_cli(
        "cvmbuild", "publish", src, "--repo", scratch / "repo", "--path", "/sw/2.0",
        env={"CVMBUILD_CACHE_DIR": str(scratch / "statcache")},
    )  # fmt: skip
    return Release(src, tree, time.monotonic() - start)


def kill_delay(trial: int, seconds: float) -> float:
    """Random moments spread over the whole publish, from start-up to the last rename."""
    return seconds * (trial + random.random()) / TRIALS


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_publish_killed_at_any_moment_leaves_the_previous_revision_intact(
    trial: int, repo: Repo, previous_release: tuple[Path, Tree], next_release: Release
) -> None:
    previous_src, previous_tree = previous_release
    run_cli("cvmbuild", "publish", previous_src, "--repo", repo.dir, "--path", "/sw/1.0")
    publish_next = ["publish", str(next_release.src), "--repo", str(repo.dir), "--path", "/sw/2.0"]

    build = subprocess.Popen(
        [str(BIN / "cvmbuild"), *publish_next], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    delay = kill_delay(trial, next_release.publish_seconds)
    time.sleep(delay)
    build.kill()
    build.communicate()
    moment = f"killed after {delay:.3f} s of a {next_release.publish_seconds:.3f} s publish"

    check = run_cli("repo-server", "check", repo.dir, "--all", check=False)
    assert check.returncode == 0, f"{moment}\n{check.stdout.decode()}"
    reader = open_reader(repo)
    assert reader.manifest is not None
    assert reader.manifest.revision in (1, 2), moment
    if reader.manifest.revision == 2:  # killed after the manifest was renamed into place
        assert read_tree(reader, "/sw/2.0") == next_release.tree, moment
    reader.select_revision(revision=1)
    assert read_tree(reader, "/sw/1.0") == previous_tree, moment
    assert reader.listdir("/sw") == [reader.lookup("/sw/1.0")], moment

    rerun = run_cli("cvmbuild", *publish_next, check=False)
    assert rerun.returncode == 0, f"{moment}\n{rerun.stderr.decode()}"
    assert b"published revision" in rerun.stdout
    reader = open_reader(repo)  # reading every file verifies every byte both prefixes name
    assert reader.manifest is not None
    assert reader.manifest.revision in (2, 3)
    assert read_tree(reader, "/sw/2.0") == next_release.tree, moment
    assert read_tree(reader, "/sw/1.0") == previous_tree, moment
    leftovers = os.listdir(repo.dir / "txn") + [p.name for p in repo.dir.rglob(".tmp-*")]
    assert leftovers == [], f"{moment}: the re-run left temporary files {leftovers}"


def test_after_a_crash_old_temporary_objects_go_and_uploads_in_flight_stay(
    tmp_path: Path, repo: Repo
) -> None:
    (repo.dir / "txn" / "dirty").touch()  # as a killed publish leaves it
    old = repo.dir / "data" / "00" / ".tmp-left-by-a-crash"
    old.write_bytes(b"half an object")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = repo.dir / "data" / "01" / ".tmp-an-upload-in-flight"
    fresh.write_bytes(b"being written by the publish API right now")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")

    run_cli("cvmbuild", "publish", tmp_path / "src", "--repo", repo.dir, "--path", "/sw")

    assert not old.exists()
    assert fresh.exists()
    # The young one is looked at again by the next publish, until it is gone.
    assert (repo.dir / "txn" / "dirty").exists()
    os.utime(fresh, (time.time() - 3600, time.time() - 3600))  # its writer never finished
    run_cli("cvmbuild", "publish", tmp_path / "src", "--repo", repo.dir, "--path", "/sw2")
    assert not fresh.exists()
    assert not (repo.dir / "txn" / "dirty").exists()


def test_temporary_files_of_a_dead_writer_on_this_host_go_at_once(
    tmp_path: Path, repo: Repo
) -> None:
    """A killed publish's files in progress are removed by the next publish, however
    young: their names say which process of which host wrote them."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = repo.dir / "data" / "02" / f".tmp-{dead.pid}@{socket.gethostname()}-0123abcd"
    left.write_bytes(b"half an object")
    (repo.dir / "txn" / "dirty").touch()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")

    run_cli("cvmbuild", "publish", tmp_path / "src", "--repo", repo.dir, "--path", "/sw")

    assert not left.exists()
    assert not (repo.dir / "txn" / "dirty").exists()
