"""The mount's memory on a walk of a million-entry tree and over many revision switches.

Publishes a tree of --entries files (1,000 per directory, a nested catalog per
directory, as large repositories are cut) into a local repository, mounts it, and walks
it with `find -type f` while sampling the resident memory of the mount's daemon and of
its fetch workers; then drops the kernel's caches (the kernel forgets its inodes) and
samples again. Then mounts a small release with --max-ttl 1, publishes --switches new
revisions one after another (each changes one file), reads every file of each revision
once the mount has switched, and samples memory every 50 switches: a week of
revisions at CernVM-FS's 4-minute TTL is 2,520 switches.

    /tmp/venv/bin/python bench/memory_bench.py [--entries N] [--switches N] [--output FILE]

Needs root (drop_caches, mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_release_tree import DEFAULT_WORK  # noqa: E402
from publish_bench import BenchError, emit, machine_header, run  # noqa: E402

BIN = Path(sys.executable).parent
NAME = "memory.example.org"
PER_DIR = 1000
SMALL_FILES = 200
SAMPLE_EVERY = 50  # switches


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(entry.path, "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def memory(mnt: Path) -> tuple[float, float, int]:
    """(daemon RSS MB, fetch workers' RSS MB summed, inodes the kernel holds)."""
    stats = json.loads(os.getxattr(mnt, "user.stats"))
    pid = int(stats["pid"])
    workers = sum(rss_mb(child) for child in children(pid))
    return rss_mb(pid), workers, int(stats["inodes"])


@contextlib.contextmanager
def mounted(repo: Path, mnt: Path, cache: Path, *options: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    key = Path(f"{repo}.keys") / f"{NAME}.pub"
    run([str(BIN / "cvmfs-client"), "mount", str(repo), str(mnt), "--key", str(key),
         "--cache-dir", str(cache), *options])  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run([str(BIN / "cvmfs-client"), "umount", str(mnt)], capture_output=True)


def publish(repo: Path, src: Path, prefix: str, env: dict[str, str]) -> None:
    run([str(BIN / "cvmbuild"), "publish", str(src), "--repo", str(repo), "--path", prefix], env)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def walk(work: Path, entries: int, env: dict[str, str]) -> list[str]:
    src = work / "big"
    start = time.monotonic()
    for d in range((entries + PER_DIR - 1) // PER_DIR):
        directory = src / f"d{d:04d}"
        directory.mkdir(parents=True)
        (directory / ".cvmfscatalog").touch()
        for i in range(min(PER_DIR, entries - d * PER_DIR)):
            (directory / f"f{i:04d}").write_bytes(b"x\n")
    made = time.monotonic() - start
    repo = work / "repo"
    start = time.monotonic()
    publish(repo, src, "/big", env)
    published = time.monotonic() - start
    shutil.rmtree(src)
    samples: list[tuple[float, float, int]] = []
    with mounted(repo, work / "mnt-walk", work / "cache-walk") as mnt:
        drop_caches()
        before = memory(mnt)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                with contextlib.suppress(OSError, ValueError):
                    samples.append(memory(mnt))

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.monotonic()
        found = subprocess.run(
            f"find '{mnt}/big' -type f | wc -l", shell=True, capture_output=True, text=True
        ).stdout.strip()
        walked = time.monotonic() - start
        done.set()
        sampler.join()
        after = memory(mnt)
        drop_caches()
        time.sleep(2)  # the kernel's FORGETs arrive
        forgotten = memory(mnt)
    peak = max(samples + [after], key=lambda s: s[0])
    return [
        f"- walk: {entries} files made in {made:.0f} s, published in {published:.0f} s; "
        f"`find -type f` found {found} in {walked:.1f} s",
        "",
        "| walk of the tree | daemon RSS (MB) | fetch workers' RSS (MB) | inodes held |",
        "| --- | ---: | ---: | ---: |",
        f"| mounted | {before[0]:.0f} | {before[1]:.0f} | {before[2]} |",
        f"| peak during the walk | {peak[0]:.0f} | {peak[1]:.0f} | {peak[2]} |",
        f"| after the walk | {after[0]:.0f} | {after[1]:.0f} | {after[2]} |",
        f"| after drop_caches | {forgotten[0]:.0f} | {forgotten[1]:.0f} | {forgotten[2]} |",
    ]


def switches(work: Path, count: int, env: dict[str, str]) -> list[str]:
    src = work / "small"
    for i in range(SMALL_FILES):
        path = src / f"p{i % 20}" / f"m{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"VALUE = {i}\n# revision 0\n")
    repo = work / "repo"
    publish(repo, src, "/small", env)
    rows = []
    start = time.monotonic()
    with mounted(repo, work / "mnt-switch", work / "cache-switch", "--max-ttl", "1") as mnt:
        revision = int(os.getxattr(mnt, "user.revision"))
        for n in range(1, count + 1):
            changed = src / f"p{n % 20}" / f"m{n % SMALL_FILES}.py"
            changed.write_text(f"VALUE = {n}\n# revision {n}\n")
            publish(repo, src, "/small", env)
            revision += 1
            deadline = time.monotonic() + 30
            while int(os.getxattr(mnt, "user.revision")) < revision:
                if time.monotonic() > deadline:
                    raise SystemExit(f"error: the mount did not switch to revision {revision}")
                time.sleep(0.05)
            for path in (mnt / "small").rglob("*.py"):
                path.read_bytes()
            if n % SAMPLE_EVERY == 0 or n == 1:
                daemon, workers, inodes = memory(mnt)
                rows.append(f"| {n} | {daemon:.0f} | {workers:.0f} | {inodes} |")
                print(rows[-1], file=sys.stderr, flush=True)
    took = time.monotonic() - start
    return [
        f"- switches: {count} revisions published and switched to in {took:.0f} s, "
        f"every file of each ({SMALL_FILES}) read after each switch",
        "",
        "| switches | daemon RSS (MB) | fetch workers' RSS (MB) | inodes held |",
        "| --- | ---: | ---: | ---: |",
        *rows,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--switches", type=int, default=500)
    parser.add_argument("--runs", type=Path, default=DEFAULT_WORK / "memory-runs")
    parser.add_argument("--output", type=Path, help="append the markdown to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (drop_caches, mounts)", file=sys.stderr)
        return 1
    work = args.runs.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"CVMBUILD_CACHE_DIR": str(work / "statcache")}
    run([str(BIN / "repo-server"), "init", str(work / "repo"), "--name", NAME])
    try:
        lines = [*machine_header(work), *walk(work, args.entries, env), ""]
        lines += switches(work, args.switches, env)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit("\n".join(lines) + "\n", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
