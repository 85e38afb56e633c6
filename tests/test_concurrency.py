"""Two release managers publish into one repository at the same moment.

Publishes are serialised by the repository lock: the second one says it is waiting,
then lands on top of the first, so no revision and no byte is lost or mixed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, Repo, Tree, open_reader, read_tree, run_cli, write_build_tree

WAITING = b"waiting for another publish"


@dataclass(frozen=True)
class BuildTree:
    src: Path
    tree: Tree


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildTree, BuildTree]:
    """Two builds big enough that each holds the lock for a good fraction of a second.

    They share most file names with different content, and each has a file of its own,
    so a mix of the two would show."""
    builds = []
    for seed, name in ((10, "gcc"), (11, "clang")):
        src = tmp_path_factory.mktemp(f"build-{name}")
        tree = write_build_tree(src, seed=seed, small_files=2000, big_files=3)
        (src / f"built-with-{name}").write_bytes(name.encode())
        tree[f"built-with-{name}"] = name.encode()
        builds.append(BuildTree(src, tree))
    return builds[0], builds[1]


def publish_together(
    repo: Repo, *jobs: tuple[BuildTree, str], extra: tuple[str, ...] = ()
) -> list[tuple[int, bytes]]:
    """Start one `cvmbuild publish` per (build, prefix) at once; their exit codes and stderr."""
    procs = [
        subprocess.Popen(
            [BIN / "cvmbuild", "publish", build.src, "--repo", repo.dir, "--path", prefix, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for build, prefix in jobs
    ]
    results = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        results.append((proc.returncode, stderr))
    return results


def test_two_publishes_to_different_prefixes_both_land(
    repo: Repo, two_builds: tuple[BuildTree, BuildTree]
) -> None:
    gcc, clang = two_builds
    before = open_reader(repo).load_manifest().revision

    results = publish_together(repo, (gcc, "/sw/gcc"), (clang, "/sw/clang"))

    assert [code for code, _ in results] == [0, 0], results
    waited = [WAITING in stderr for _, stderr in results]
    assert sorted(waited) == [False, True], results
    reader = open_reader(repo)
    assert reader.load_manifest().revision == before + 2
    assert read_tree(reader, "/sw/gcc") == gcc.tree
    assert read_tree(reader, "/sw/clang") == clang.tree
    run_cli("repo-server", "check", repo.dir, "--all")


def test_two_publishes_to_the_same_prefix_leave_one_complete_build(
    repo: Repo, two_builds: tuple[BuildTree, BuildTree]
) -> None:
    gcc, clang = two_builds
    before = open_reader(repo).load_manifest().revision

    # Each build replaces whatever /sw/current held: the second one removes the first's.
    results = publish_together(
        repo, (gcc, "/sw/current"), (clang, "/sw/current"), extra=("--replace",)
    )

    assert [code for code, _ in results] == [0, 0], results
    reader = open_reader(repo)
    assert reader.load_manifest().revision == before + 2
    waited = [WAITING in stderr for _, stderr in results]
    assert sorted(waited) == [False, True], results
    first, last = (clang, gcc) if waited[0] else (gcc, clang)
    assert read_tree(reader, "/sw/current") == last.tree  # the one that waited committed last
    reader.select_revision(revision=before + 1)
    assert read_tree(reader, "/sw/current") == first.tree
    run_cli("repo-server", "check", repo.dir, "--all")
