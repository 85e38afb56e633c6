"""Mirroring speed of `repo-server replicate` against `wget --mirror` of the same files.

Publishes bench/work/release1 into a fresh repository and serves it with nginx on
loopback (with `autoindex on`, so wget can recurse through data/xx/). Each trial makes
a new mirror with each tool (cold) and then runs it again with nothing new (update);
prints a markdown table of medians with ratios against wget.

    /tmp/venv/bin/python bench/replicate_bench.py [--tree DIR] [--repeat N] [--output FILE]

Needs nginx and wget.
"""

from __future__ import annotations

import datetime
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_release_tree import tree_stats  # noqa: E402
from mount_bench import accepting, free_port, stop, wait_for  # noqa: E402
from publish_bench import (  # noqa: E402
    BenchError,
    Timing,
    _first_line,
    bench_arguments,
    emit,
    file_bytes,
    machine_header,
    run,
)

from repo_server.nginx import repository_server, standalone  # noqa: E402

BIN = Path(sys.executable).parent  # cvmbuild and repo-server of the interpreter running us
NAME = "bench.example.org"
TOOLS = ("replicate", "wget")
STEPS = {"cold": "new mirror (cold)", "update": "update, nothing new"}
TARGET = 1.5  # replicate/wget, cold (issue 4)


class Setup:
    """The repository, published from the tree, and the nginx serving it."""

    def __init__(self, tree: Path, run_dir: Path):
        self.tree = tree
        self.run_dir = run_dir
        self.repo = run_dir / "repo"
        self.key = Path(f"{self.repo}.keys") / f"{NAME}.pub"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.publish_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True)
        run([str(BIN / "repo-server"), "init", str(self.repo), "--name", NAME])
        env = {"CVMBUILD_CACHE_DIR": str(self.run_dir / "statcache")}
        cmd = [str(BIN / "cvmbuild"), "publish", str(self.tree), "--repo", str(self.repo)]
        self.publish_s = run([*cmd, "--path", "/sw/release"], env).wall
        work = self.run_dir / "nginx"
        work.mkdir()
        self.port = free_port()
        conf = work / "nginx.conf"
        # docs/OPERATING.md's repository configuration, plus listings for wget to recurse.
        server = repository_server(str(self.repo), f"127.0.0.1:{self.port}", listings=True)
        conf.write_text(standalone(str(work), [server], workers=2, as_root=True))
        with (work / "stderr").open("wb") as out:
            self.proc = subprocess.Popen(
                ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for("nginx", lambda: accepting(self.port), self.proc)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def mirror(self, tool: str, into: Path) -> Timing:
        if tool == "replicate":
            cmd = [str(BIN / "repo-server"), "replicate", self.url, str(into)]
            return run([*cmd, "--key", str(self.key)])
        # -N (in --mirror) makes the second run ask If-Modified-Since for every file.
        return run(
            ["wget", "--mirror", "--no-parent", "--no-host-directories", "--quiet",
             "-e", "robots=off", "--reject", "index.html*", "-P", str(into), f"{self.url}/"]
        )  # fmt: skip


def objects_in(directory: Path) -> tuple[int, int]:
    """(number, bytes) of the object files under directory/data."""
    count = 0
    for _root, _dirs, names in os.walk(directory / "data"):
        count += sum(not n.startswith(".tmp-") for n in names)
    return count, file_bytes(directory / "data")


def trial(setup: Setup, results: dict[str, dict[str, list[float]]], number: int) -> str:
    summary = ""
    # Alternate which tool goes first, so neither always meets a colder cache.
    for tool in TOOLS if number % 2 else reversed(TOOLS):
        into = setup.run_dir / f"{tool}-{number}"
        os.sync()
        got = results.setdefault(tool, {})
        for step in STEPS:
            timing = setup.mirror(tool, into)
            got.setdefault(step, []).append(timing.wall)
            if tool == "replicate" and step == "cold":
                summary = timing.stdout
        count, size = objects_in(into)
        got.setdefault("objects", []).append(count)
        got.setdefault("bytes", []).append(size)
        print(
            f"trial {number} {tool}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in got.items()),
            file=sys.stderr,
            flush=True,
        )
    return summary


def report(
    results: dict[str, dict[str, list[float]]], setup: Setup, repeat: int, summary: str
) -> str:
    med = {t: {k: statistics.median(xs) for k, xs in got.items()} for t, got in results.items()}
    n_files, n_bytes = tree_stats(setup.tree)
    load = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        *machine_header(setup.tree),
        f"- {_first_line('nginx -v 2>&1')}; {_first_line(['wget', '--version'])}",
        f"- tree: bench/work/release1, {n_files} files, {n_bytes / 1e6:.0f} MB, published "
        f"into a fresh repository in {setup.publish_s:.1f} s; served by nginx "
        "(2 workers, sendfile) on loopback with `autoindex on` for wget",
        f"- medians of {repeat} runs, each into a new directory; `sync` before each tool; "
        "replicate verifies every object (decompress + SHA-256) before storing it, wget "
        "stores what it is sent; load average at the end (1, 5, 15 min): " + ", ".join(load),
        "",
        "| measurement | " + " | ".join(TOOLS) + " | replicate/wget | target |",
        "| --- | " + " | ".join("---:" for _ in TOOLS) + " | ---: | --- |",
    ]
    for step, title in STEPS.items():
        ratio = med["replicate"][step] / med["wget"][step]
        target = ""
        if step == "cold":
            target = f"≤ {TARGET}: {'met' if ratio <= TARGET else 'missed'}"
        cells = " | ".join(f"{med[t][step]:.2f} s" for t in TOOLS)
        lines.append(f"| {title} | {cells} | {ratio:.2f} | {target} |")
    cells = " | ".join(f"{med[t]['objects']:.0f}" for t in TOOLS)
    lines.append(f"| object files in the mirror | {cells} | | |")
    cells = " | ".join(f"{med[t]['bytes'] / 1e6:.1f}" for t in TOOLS)
    lines.append(f"| MB of object files in the mirror | {cells} | | |")
    lines += ["", "All runs (wall seconds):", ""]
    for tool in TOOLS:
        lines.append(
            f"- {tool}: "
            + "; ".join(f"{s} " + ", ".join(f"{x:.2f}" for x in results[tool][s]) for s in STEPS)
        )
    lines += ["", "Last replicate summary line:", "", "```", summary, "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = bench_arguments("replicate-runs")
    runs = args.runs.resolve()
    shutil.rmtree(runs, ignore_errors=True)  # left by an earlier run
    setup = Setup(args.tree.resolve(), runs / datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    results: dict[str, dict[str, list[float]]] = {}
    summary = ""
    try:
        setup.prepare()
        for number in range(1, args.repeat + 1):
            summary = trial(setup, results, number)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        setup.close()
        shutil.rmtree(runs, ignore_errors=True)
    text = report(results, setup, args.repeat, summary)
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
