"""Publishing over HTTP (`repo-server serve` on loopback) against publishing locally.

On release 1 (bench/make_release_tree.py), each trial publishes it cold into a fresh
local repository, then cold into another fresh repository through the publish API, then
re-publishes it unchanged over HTTP; prints a markdown table of medians.

    /tmp/venv/bin/python bench/publish_http_bench.py [--repeat N] [--output FILE]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_release_tree import DEFAULT_WORK, ensure_trees, tree_stats  # noqa: E402
from mount_bench import free_port  # noqa: E402
from publish_bench import BIN, BenchError, emit, machine_header, run, warm  # noqa: E402

NAME = "bench.example.org"
RATIO_TARGET = 1.3  # http cold / local cold
UNCHANGED_TARGET = 1.0  # seconds


@contextmanager
def served(repo: Path, log: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "repo-server"), "serve", str(repo), "--listen", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(
                        f"repo-server serve did not start: {log.read_text()}"
                    ) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def trial(tree: Path, work: Path, results: dict[str, list[float]]) -> None:
    publish = [str(BIN / "cvmbuild"), "publish", str(tree), "--path", "/sw/release"]

    local = work / "local"
    run([str(BIN / "repo-server"), "init", str(local), "--name", NAME])
    env = {"CVMBUILD_CACHE_DIR": str(work / "cache-local")}
    results.setdefault("local cold", []).append(run([*publish, "--repo", str(local)], env).wall)

    remote = work / "remote"
    run([str(BIN / "repo-server"), "init", str(remote), "--name", NAME])
    token = run([str(BIN / "repo-server"), "token", "add", str(remote), "--name", "bench",
                 "--path", "/"]).stdout  # fmt: skip
    env = {"CVMBUILD_CACHE_DIR": str(work / "cache-remote"), "CVMBUILD_TOKEN": token}
    with served(remote, work / "serve.log") as url:
        cold = run([*publish, "--repo", url], env)
        again = run([*publish, "--repo", url], env)
    results.setdefault("http cold", []).append(cold.wall)
    results.setdefault("http unchanged", []).append(again.wall)
    if "(0 objects, 0 catalogs)" not in again.stdout:
        raise BenchError(f"the unchanged re-publish uploaded something: {again.stdout}")
    print(", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()), file=sys.stderr, flush=True)


def report(results: dict[str, list[float]], tree: Path, repeat: int) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    files, size = tree_stats(tree)
    ratio = med["http cold"] / med["local cold"]
    verdict = "met" if ratio <= RATIO_TARGET else "missed"
    unchanged = "met" if med["http unchanged"] <= UNCHANGED_TARGET else "missed"
    lines = [
        *machine_header(tree),
        f"- tree: {tree.name}, {files} files, {size / 1e6:.0f} MB; medians of {repeat} runs; "
        "page cache warm; fresh repository and stat cache for each cold publish; "
        "`repo-server serve` and `cvmbuild` on the same 2 cores over loopback",
        "",
        "| measurement | seconds | ratio | target |",
        "| --- | ---: | ---: | --- |",
        f"| cold publish into a local directory | {med['local cold']:.2f} | 1.00 | |",
        f"| cold publish over HTTP | {med['http cold']:.2f} | {ratio:.2f} "
        f"| ≤ {RATIO_TARGET}× local: {verdict} |",
        f"| unchanged re-publish over HTTP | {med['http unchanged']:.2f} | | "
        f"≤ {UNCHANGED_TARGET} s: {unchanged} |",
        "",
        "All runs: "
        + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v) for k, v in results.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument("--output", type=Path, help="append the markdown to this file")
    args = parser.parse_args()
    try:
        trees = ensure_trees(DEFAULT_WORK)
        results: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            warm(trees)
            work = Path(tempfile.mkdtemp(prefix="publish-http-", dir=DEFAULT_WORK))
            try:
                trial(trees.release1, work, results)
            finally:
                shutil.rmtree(work)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = report(results, trees.release1, args.repeat)
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
