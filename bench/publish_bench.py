"""Publishing speed and stored size of `cvmbuild publish` against borg, restic and tar|zstd.

On the same two releases (bench/make_release_tree.py), each tool does a cold backup of
release 1 into a fresh repository, an unchanged re-run of release 1, then release 2
into the same repository; prints a markdown table of medians with ratios against borg.

    /tmp/venv/bin/python bench/publish_bench.py [--tree DIR] [--repeat N] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_release_tree import DEFAULT_WORK, Trees, ensure_trees, tree_stats  # noqa: E402

BIN = Path(sys.executable).parent  # cvmbuild and repo-server of the interpreter running us
STEPS = ("cold", "unchanged", "release2")
STEP_TITLES = {
    "cold": "cold publish of release 1 (fresh repo, empty cache)",
    "unchanged": "no-change re-publish of release 1",
    "release2": "publish of release 2 into the same repo",
}
# ours/borg must be at most this (issue 2).
TIME_TARGETS = {"cold": 0.8, "unchanged": 0.5, "release2": 0.8}
SIZE_TARGET = 1.0


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float  # user + system of the tool and everything it started
    stdout: str


def run(cmd: list[str] | str, env: dict[str, str] | None = None) -> Timing:
    """Run one command (a list, or a bash pipeline string), timed; raise with its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    argv = ["bash", "-o", "pipefail", "-c", cmd] if isinstance(cmd, str) else cmd
    proc = subprocess.run(
        argv, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        raise BenchError(f"{shown} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu, proc.stdout.strip())


def output_of(cmd: list[str] | str) -> str:
    return run(cmd).stdout


def du_bytes(path: Path, apparent: bool = True) -> int:
    flag = "-sb" if apparent else "-sB1"
    return int(output_of(["du", flag, str(path)]).split()[0])


def file_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        total += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
    return total


@dataclass(frozen=True)
class Sizes:
    apparent: int  # du -sb
    allocated: int  # du -sB1: what the file system spends, block rounding included
    objects: int | None  # ours only: sum of object file sizes under data/


class Tool:
    """One contender: make a fresh repository, back a tree up into it, measure it."""

    name = ""
    has_repo = True

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.dir = self.repo = run_dir

    def fresh(self, number: int) -> None:
        # Each trial gets new directories and nothing is deleted until the end: on ext4
        # without a journal (this machine) creating inodes right after deleting many
        # costs extra (recently_deleted() in the inode allocator), which would tax
        # whichever tool runs after a cleanup.
        self.dir = self.run_dir / f"{self.name}-{number}"
        self.repo = self.dir / "repo"
        self.dir.mkdir(parents=True)
        self.init()

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, tree: Path, label: str) -> Timing:
        raise NotImplementedError

    def sizes(self) -> Sizes:
        return Sizes(du_bytes(self.repo), du_bytes(self.repo, apparent=False), None)


class Cvmbuild(Tool):
    name = "cvmbuild"

    @property
    def env(self) -> dict[str, str]:
        return {"CVMBUILD_CACHE_DIR": str(self.dir / "statcache")}

    def init(self) -> None:
        run([str(BIN / "repo-server"), "init", str(self.repo), "--name", "bench.example.org"])

    def backup(self, tree: Path, label: str) -> Timing:
        cmd = [str(BIN / "cvmbuild"), "publish", str(tree), "--repo", str(self.repo)]
        # Each release replaces the one before at one path, as a backup tool's snapshot does.
        return run([*cmd, "--path", "/sw/release", "--replace"], self.env)

    def sizes(self) -> Sizes:
        base = super().sizes()
        return Sizes(base.apparent, base.allocated, file_bytes(self.repo / "data"))


class Borg(Tool):
    name = "borg"

    @property
    def env(self) -> dict[str, str]:
        return {
            "BORG_BASE_DIR": str(self.dir / "base"),  # cache, security and config dirs
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self) -> None:
        run(["borg", "init", "-e", "none", str(self.repo)], self.env)

    def backup(self, tree: Path, label: str) -> Timing:
        return run(["borg", "create", "-C", "zstd,3", f"{self.repo}::{label}", str(tree)], self.env)


class Restic(Tool):
    name = "restic"

    @property
    def env(self) -> dict[str, str]:
        return {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(self.dir / "cache")}

    def init(self) -> None:
        run(["restic", "init", "-q", "-r", str(self.repo)], self.env)

    def backup(self, tree: Path, label: str) -> Timing:
        cmd = ["restic", "-r", str(self.repo), "backup", "-q", "--host", "bench"]
        return run([*cmd, "--tag", label, str(tree)], self.env)


class TarZstd(Tool):
    """The floor: read everything, compress everything, no dedup, no index."""

    name = "tar+zstd"
    has_repo = False  # no notion of an unchanged re-run

    def init(self) -> None:
        self.repo.mkdir()

    def backup(self, tree: Path, label: str) -> Timing:
        out = self.repo / f"{label}.tar.zst"
        return run(f"tar -C '{tree}' -cf - . | zstd -3 -T0 -q > '{out}'")


TOOLS: tuple[type[Tool], ...] = (Cvmbuild, Borg, Restic, TarZstd)


@dataclass
class Results:
    times: dict[str, dict[str, list[Timing]]] = field(default_factory=dict)
    sizes: dict[str, dict[str, list[Sizes]]] = field(default_factory=dict)
    last_output: dict[str, str] = field(default_factory=dict)

    def add_time(self, tool: str, step: str, t: Timing) -> None:
        self.times.setdefault(tool, {}).setdefault(step, []).append(t)

    def add_size(self, tool: str, after: str, s: Sizes) -> None:
        self.sizes.setdefault(tool, {}).setdefault(after, []).append(s)

    def wall(self, tool: str, step: str) -> float:
        return statistics.median(t.wall for t in self.times[tool][step])

    def cpu(self, tool: str, step: str) -> float:
        return statistics.median(t.cpu for t in self.times[tool][step])

    def size(self, tool: str, after: str, pick: Callable[[Sizes], int | None]) -> int | None:
        values = [pick(s) for s in self.sizes[tool][after]]
        if any(v is None for v in values):
            return None
        return int(statistics.median(v for v in values if v is not None))


def warm(trees: Trees) -> None:
    """Every tool starts from the same warm page cache; dirty pages are flushed first."""
    for tree in (trees.release1, trees.release2):
        run(f"find '{tree}' -type f -exec cat {{}} + > /dev/null")
    os.sync()


def trial(tools: list[Tool], trees: Trees, results: Results, number: int) -> None:
    warm(trees)
    for tool in tools:
        tool.fresh(number)
        for step, tree in (
            ("cold", trees.release1),
            ("unchanged", trees.release1),
            ("release2", trees.release2),
        ):
            if step == "unchanged" and not tool.has_repo:
                continue
            os.sync()  # earlier writes (init, other tools) are not charged to this run
            timing = tool.backup(tree, f"{step}-{number}")
            results.add_time(tool.name, step, timing)
            if timing.stdout:
                results.last_output[f"{tool.name} {step}"] = timing.stdout
            if step != "unchanged":
                results.add_size(tool.name, step, tool.sizes())
        print(
            f"trial {number} {tool.name}: "
            + ", ".join(
                f"{s} {results.times[tool.name][s][-1].wall:.2f} s"
                for s in STEPS
                if s in results.times[tool.name]
            ),
            file=sys.stderr,
            flush=True,
        )


def _first_line(cmd: list[str] | str) -> str:
    try:
        return output_of(cmd).splitlines()[0].strip()
    except (BenchError, OSError, IndexError):
        return "unknown"


def bench_arguments(runs: str) -> argparse.Namespace:
    """--tree, --repeat, --runs and --output, as the mount and replication benches take them."""
    parser = argparse.ArgumentParser(
        description=(sys.modules["__main__"].__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--tree", type=Path, default=DEFAULT_WORK / "release1", help="the tree to publish"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument(
        "--runs", type=Path, default=DEFAULT_WORK / runs, help="where everything goes"
    )
    parser.add_argument("--output", type=Path, help="append the markdown to this file")
    return parser.parse_args()


def emit(text: str, output: Path | None) -> None:
    """Print a report, and append it to output (e.g. docs/PERFORMANCE.md) if given."""
    print(text)
    if output:
        with open(output, "a") as f:
            f.write(text)


def machine_header(tree: Path) -> list[str]:
    """Date, CPU, memory, kernel, the file system holding tree, Python and our commit:
    the lines every benchmark report starts with."""
    model = "unknown"
    for line in output_of(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    import zstandard

    repo_root = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"])
    dirty = output_of(
        ["git", "-C", str(repo_root), "status", "--porcelain", "--",
         "cvmbuild", "cvmfs_client", "cvmfs_format", "repo_server"]
    )  # fmt: skip
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {model}, {os.cpu_count()} cores; RAM {mem_kb / 1024 / 1024:.1f} GiB; "
        f"kernel {platform.release()}; file system "
        f"{_first_line(['findmnt', '-no', 'FSTYPE', '-T', str(tree)])}",
        f"- Python {platform.python_version()}, zstandard {zstandard.__version__}; "
        f"product at commit {commit}{' (product code modified)' if dirty else ''}",
    ]


def machine(trees: Trees) -> list[str]:
    return [
        *machine_header(trees.release1),
        f"- {_first_line(['borg', '--version'])}; {_first_line(['restic', 'version'])}; "
        f"{_first_line(['tar', '--version'])}; {_first_line(['zstd', '--version']).strip('* ')}",
    ]


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def _ratio(
    ours: float | None, borg: float | None, target: float, digits: int = 2
) -> tuple[str, str]:
    if ours is None or not borg:
        return "–", "–"
    r = ours / borg
    return f"{r:.{digits}f}", f"≤ {target:.1f}: {'met' if r <= target else 'missed'}"


def report(results: Results, trees: Trees, repeat: int) -> str:
    names = [t.name for t in TOOLS]
    r1_files, r1_bytes = tree_stats(trees.release1)
    r2_files, r2_bytes = tree_stats(trees.release2)
    lines = [
        *machine(trees),
        f"- release 1: {r1_files} files, {r1_bytes / 1e6:.0f} MB "
        f"(venv: numpy, scipy, pandas, matplotlib, sympy); release 2: {r2_files} files, "
        f"{r2_bytes / 1e6:.0f} MB (pandas and sympy updated, rest copied with cp -a)",
        f"- medians of {repeat} runs, each cold run into a fresh repository; page cache "
        "warm for every tool, `sync` before each run, no repository deleted before the "
        "end; borg `create -C zstd,3`, restic "
        "default (auto) compression, `tar | zstd -3 -T0` as the floor",
        "",
        "| step | " + " | ".join(names) + " | ours/borg | target |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | --- |",
    ]
    for step in STEPS:
        cells = []
        for name in names:
            if step in results.times.get(name, {}):
                cells.append(f"{results.wall(name, step):.2f} s")
            else:
                cells.append("–")
        ratio, verdict = _ratio(
            results.wall("cvmbuild", step), results.wall("borg", step), TIME_TARGETS[step]
        )
        lines.append(f"| {STEP_TITLES[step]} | " + " | ".join(cells) + f" | {ratio} | {verdict} |")
    for after, title in (("cold", "after release 1"), ("release2", "after releases 1 + 2")):
        cells = [_mb(results.size(n, after, lambda s: s.apparent)) for n in names]
        ratio, verdict = _ratio(
            results.size("cvmbuild", after, lambda s: s.apparent),
            results.size("borg", after, lambda s: s.apparent),
            SIZE_TARGET,
            digits=3,  # sizes sit close to the target
        )
        lines.append(
            f"| stored MB {title} (du -sb) | " + " | ".join(cells) + f" | {ratio} | {verdict} |"
        )
    lines += [
        "",
        "CPU seconds (user + system, median) and disk use including block rounding:",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for step in STEPS:
        cells = [
            f"{results.cpu(n, step):.2f}" if step in results.times.get(n, {}) else "–"
            for n in names
        ]
        lines.append(f"| CPU s, {step} | " + " | ".join(cells) + " |")
    for after, title in (("cold", "release 1"), ("release2", "releases 1 + 2")):
        cells = [_mb(results.size(n, after, lambda s: s.allocated)) for n in names]
        lines.append(f"| allocated MB after {title} (du -sB1) | " + " | ".join(cells) + " |")
    for after, title in (("cold", "release 1"), ("release2", "releases 1 + 2")):
        ours = _mb(results.size("cvmbuild", after, lambda s: s.objects))
        lines.append(
            f"| object files MB after {title} (sum of sizes under data/) | {ours} |"
            + " – |" * (len(names) - 1)
        )
    lines += ["", "All runs (wall seconds):", ""]
    for name in names:
        runs = "; ".join(
            f"{step} " + ", ".join(f"{t.wall:.2f}" for t in results.times[name][step])
            for step in STEPS
            if step in results.times.get(name, {})
        )
        lines.append(f"- {name}: {runs}")
    summaries = [f"  {k}: {v}" for k, v in results.last_output.items() if k.startswith("cvmbuild")]
    if summaries:
        lines += ["", "Last cvmbuild summary lines:", "", "```", *summaries, "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tree",
        type=Path,
        default=DEFAULT_WORK,
        help="directory holding release1/ and release2/ (built there when missing)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument("--runs", type=Path, help="where the repositories go (default: TREE/runs)")
    parser.add_argument("--output", type=Path, help="append the markdown to this file")
    args = parser.parse_args()
    trees = ensure_trees(args.tree.resolve())
    run_dir = (args.runs or args.tree / "runs").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)  # left by an interrupted run
    tools = [tool(run_dir) for tool in TOOLS]
    results = Results()
    try:
        for number in range(1, args.repeat + 1):
            trial(tools, trees, results, number)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    text = report(results, trees, args.repeat)
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
