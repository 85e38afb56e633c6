"""The operator's commands killed at random moments: nothing a client reads breaks.

The story: a machine dies, or cron's job is killed, in the middle of `cvmbuild publish`,
`repo-server gc`, `key rotate`, `whitelist renew` or `replicate`. Afterwards
`repo-server check --all` is green (for a mirror: checked with only the public key, as
a mirror's operator has it), the last revision reads back byte for byte through a
client, and running the same command again succeeds and leaves no temporary file.

Each command is killed with SIGKILL (its whole process group, as a machine or a cron
timeout stops it) at seeded random moments of an uninterrupted run's duration, from
right after its start to just past its end; and, since most of a short command's time
is Python starting, also just before chosen ones of its renames, links and unlinks
(tests/kill_points.py), where the states a crash can leave on disk change.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    MiB,
    Repo,
    Tree,
    backdate_history,
    open_reader,
    read_tree,
    run_cli,
    serving,
    write_build_tree,
)
from tests.kill_points import PROGRAMS, count_commit_calls, run_killed_at, was_killed

SEED = 15
MOMENTS = 4  # timed kills per command
POINTS = 6  # kills at commit calls per command, at most (all of them when fewer)
NAME = "crash.example.org"
WEEK = 7 * 86400

Contents = dict[str, Tree]  # what a revision holds: prefix -> files below it


@dataclass
class Scenario:
    """A command, the state it starts from, and what each revision must hold."""

    start: Path  # copied for each kill: repo/, repo.keys/ and, for replicate, mirror/
    argv: Callable[[Path], list[str]]  # the command line, run in a copy
    served: Callable[[Path], Repo]  # what clients read in a copy (a repository or a mirror)
    contents: Callable[[int], Contents]  # by revision
    seconds: float = 0.0  # one uninterrupted run
    calls: int = 0  # commit calls of one uninterrupted run
    point_argv: Callable[[Path], list[str]] | None = None  # for kill points, if other

    def copy(self, root: Path) -> Path:
        shutil.copytree(self.start, root, symlinks=True)
        return root

    def measure(self, scratch: Path) -> None:
        begin = time.monotonic()
        run_cli(*self.argv(self.copy(scratch / "timed")))
        self.seconds = time.monotonic() - begin
        program, *argv = (self.point_argv or self.argv)(self.copy(scratch / "counted"))
        self.calls = count_commit_calls(program, *argv)


# -- the starting states -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Tree]]:
    """Two releases' build trees: a small one and one that takes a second or two."""
    made = {}
    for version, seed, small, big in (("1.0", 1, 60, 1), ("2.0", 2, 1200, 2)):
        src = tmp_path_factory.mktemp(f"release-{version}")
        tree = write_build_tree(src, seed=seed, small_files=small, big_files=big, big_size=3 * MiB)
        made[version] = (src, tree)
    return made


def new_repository(root: Path) -> Repo:
    run_cli("repo-server", "init", root / "repo", "--name", NAME)
    return Repo(root / "repo", root / "repo.keys", NAME)


def publish_into(repo: Repo, src: Path, path: str, statcache: Path) -> None:
    # Module fixtures run outside the per-test stat cache: give them their own. A
    # release replaces the one before where both go to /sw.
    run_cli(
        "cvmbuild", "publish", src, "--repo", repo.dir, "--path", path, "--replace",
        env={"CVMBUILD_CACHE_DIR": str(statcache)},
    )  # fmt: skip


def in_copy(root: Path) -> Repo:
    return Repo(root / "repo", root / "repo.keys", NAME)


@pytest.fixture(scope="module")
def publish_scenario(
    tmp_path_factory: pytest.TempPathFactory, trees: dict[str, tuple[Path, Tree]]
) -> Scenario:
    """Release 1.0 published; the command publishes 2.0 beside it."""
    start = tmp_path_factory.mktemp("publish-start")
    publish_into(new_repository(start), trees["1.0"][0], "/sw/1.0", start.parent / "sc-p")
    first = {"/sw/1.0": trees["1.0"][1]}
    both = {**first, "/sw/2.0": trees["2.0"][1]}

    def argv(root: Path) -> list[str]:
        src = str(trees["2.0"][0])
        return ["cvmbuild", "publish", src, "--repo", str(root / "repo"), "--path", "/sw/2.0"]

    scenario = Scenario(start, argv, in_copy, lambda revision: first if revision == 1 else both)
    scenario.measure(tmp_path_factory.mktemp("publish-scratch"))
    return scenario


@pytest.fixture(scope="module")
def gc_scenario(
    tmp_path_factory: pytest.TempPathFactory, trees: dict[str, tuple[Path, Tree]]
) -> Scenario:
    """Releases 1.0 then 2.0 at /sw, a week ago; the command keeps only the last."""
    start = tmp_path_factory.mktemp("gc-start")
    repo = new_repository(start)
    for version in ("1.0", "2.0"):
        publish_into(repo, trees[version][0], "/sw", start.parent / "sc-gc")
    backdate_history(repo.open(), WEEK)
    last = {"/sw": trees["2.0"][1]}

    def argv(root: Path) -> list[str]:
        keep = ["--keep-revisions", "1", "--grace", "0"]
        return ["repo-server", "gc", str(root / "repo"), *keep]

    scenario = Scenario(start, argv, in_copy, lambda revision: last)
    scenario.measure(tmp_path_factory.mktemp("gc-scratch"))
    return scenario


@pytest.fixture(scope="module")
def published_start(
    tmp_path_factory: pytest.TempPathFactory, trees: dict[str, tuple[Path, Tree]]
) -> Path:
    start = tmp_path_factory.mktemp("keys-start")
    publish_into(new_repository(start), trees["1.0"][0], "/sw", start.parent / "sc-k")
    return start


def key_scenario(
    tmp_path_factory: pytest.TempPathFactory,
    start: Path,
    trees: dict[str, tuple[Path, Tree]],
    *command: str,
) -> Scenario:
    """A repository with one release; the command works on its keys and whitelist."""
    only = {"/sw": trees["1.0"][1]}
    scenario = Scenario(
        start, lambda root: ["repo-server", *command, str(root / "repo")], in_copy, lambda _: only
    )
    scenario.measure(tmp_path_factory.mktemp("-".join(command)))
    return scenario


@pytest.fixture(scope="module")
def rotate_scenario(
    tmp_path_factory: pytest.TempPathFactory,
    published_start: Path,
    trees: dict[str, tuple[Path, Tree]],
) -> Scenario:
    return key_scenario(tmp_path_factory, published_start, trees, "key", "rotate")


@pytest.fixture(scope="module")
def renew_scenario(
    tmp_path_factory: pytest.TempPathFactory,
    published_start: Path,
    trees: dict[str, tuple[Path, Tree]],
) -> Scenario:
    return key_scenario(tmp_path_factory, published_start, trees, "whitelist", "renew")


@pytest.fixture(scope="module")
def replicate_scenario(
    tmp_path_factory: pytest.TempPathFactory, trees: dict[str, tuple[Path, Tree]]
) -> Iterator[Scenario]:
    """A mirror of revision 1 (release 1.0); the source, served over HTTP for the whole
    module, has revision 2 (2.0 beside it). The mirror's operator has the public key only."""
    source_root = tmp_path_factory.mktemp("replicate-source")
    source = new_repository(source_root)
    statcache = source_root / "statcache"
    publish_into(source, trees["1.0"][0], "/sw/1.0", statcache)
    start = tmp_path_factory.mktemp("replicate-start")
    (start / "public").mkdir()
    shutil.copy(source.pub, start / "public")
    with serving(source.dir, source_root / "serve.log") as url:
        run_cli("repo-server", "replicate", url, start / "mirror", "--key", source.pub)
        publish_into(source, trees["2.0"][0], "/sw/2.0", statcache)
        first = {"/sw/1.0": trees["1.0"][1]}
        both = {**first, "/sw/2.0": trees["2.0"][1]}

        def argv(root: Path) -> list[str]:
            key = root / "public" / f"{NAME}.pub"
            return ["repo-server", "replicate", url, str(root / "mirror"), "--key", str(key)]

        scenario = Scenario(
            start,
            argv,
            lambda root: Repo(root / "mirror", root / "public", NAME),
            lambda revision: first if revision == 1 else both,
            # Its worker processes would not die with the parent at a kill point.
            point_argv=lambda root: [*argv(root), "--workers", "1"],
        )
        scenario.measure(tmp_path_factory.mktemp("replicate-scratch"))
        yield scenario


COMMANDS = {
    "publish": "publish_scenario",
    "gc": "gc_scenario",
    "key rotate": "rotate_scenario",
    "whitelist renew": "renew_scenario",
    "replicate": "replicate_scenario",
}


# -- what must hold after a kill -----------------------------------------------------------


def assert_served_whole(scenario: Scenario, root: Path, moment: str) -> str:
    """check --all is green and the head revision reads back byte for byte; returns what
    check said on stderr (its warnings)."""
    served = scenario.served(root)
    result = run_cli("repo-server", "check", served.dir, "--keys", served.keys, "--all",
                     check=False)  # fmt: skip
    said = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, f"{moment}\n{said}"
    reader = open_reader(served)
    assert reader.manifest is not None
    for prefix, tree in scenario.contents(reader.manifest.revision).items():
        assert read_tree(reader, prefix) == tree, f"{moment}: {prefix} differs"
    return result.stderr.decode()


def assert_recovers(scenario: Scenario, root: Path, moment: str) -> None:
    assert_served_whole(scenario, root, moment)

    rerun = run_cli(*scenario.argv(root), check=False)

    assert rerun.returncode == 0, f"{moment}: the re-run failed\n{rerun.stderr.decode()}"
    warnings = assert_served_whole(scenario, root, f"{moment}, then run again")
    assert "warning" not in warnings, f"{moment}, then run again: {warnings}"
    leftovers = [str(p.relative_to(root)) for p in root.rglob(".tmp-*")]
    assert leftovers == [], f"{moment}, then run again: temporary files left {leftovers}"


def wait_group_gone(group: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"processes of group {group} still run"
        time.sleep(0.02)


def kill_moments(command: str) -> list[float]:
    """Fractions of an uninterrupted run: one right after the start, random ones in
    between, and one around the end."""
    rng = random.Random(f"{SEED} {command}")
    middle = sorted(rng.uniform(0.05, 0.9) for _ in range(MOMENTS - 2))
    return [rng.uniform(0, 0.05), *middle, rng.uniform(0.9, 1.1)]


def kill_points(command: str, calls: int) -> list[int]:
    """Commit calls to die before: all of them, or the first, the last and random ones."""
    if calls <= POINTS:
        return list(range(1, calls + 1))
    rng = random.Random(f"{SEED} {command} points")
    return sorted({1, calls, *rng.sample(range(2, calls), POINTS - 2)})


# -- the suite -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(MOMENTS))
@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_killed_at_a_random_moment_leaves_check_green_and_the_head_readable(
    command: str, trial: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    scenario: Scenario = request.getfixturevalue(COMMANDS[command])
    root = scenario.copy(tmp_path / "copy")
    program, *argv = scenario.argv(root)
    delay = kill_moments(command)[trial] * scenario.seconds

    proc = subprocess.Popen(
        [str(BIN / program), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    wait_group_gone(proc.pid)  # replicate's workers too: a re-run sees their files as dead

    ended = "killed" if proc.returncode == -signal.SIGKILL else f"ended ({proc.returncode})"
    moment = f"{command} {ended} after {delay:.3f} s of a {scenario.seconds:.3f} s run"
    assert proc.returncode in (0, -signal.SIGKILL), f"{moment}\n{stderr.decode()}"
    assert_recovers(scenario, root, moment)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_killed_before_a_file_system_change_leaves_check_green_and_the_head_readable(
    command: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    scenario: Scenario = request.getfixturevalue(COMMANDS[command])
    for point in kill_points(command, scenario.calls):
        root = scenario.copy(tmp_path / f"point-{point}")
        program, *argv = (scenario.point_argv or scenario.argv)(root)
        assert program in PROGRAMS

        killed = run_killed_at(point, program, *argv)

        moment = f"{command} killed before commit call {point} of {scenario.calls}"
        assert was_killed(killed), f"{moment}: not reached\n{killed.stderr.decode()}"
        assert_recovers(scenario, root, moment)
