"""Building and booting the thin appliance: warm build time, each conversion's time,
image size per format, and boot-to-job time under QEMU software emulation.

Builds recipes/thin.toml once to warm the package cache (unless --no-warmup), then
builds it again in every format (ami against a moto server on the loopback) and boots
the qcow2 against a repository served on the loopback. Prints a markdown table with
each figure against the issue's target. Needs root (mmdebstrap --mode=root).

    /tmp/venv/bin/python bench/appliance_bench.py [--boots N] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from publish_bench import emit  # noqa: E402

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "thin.toml"
FORMATS = ["raw", "qcow2", "vdi", "vmdk", "ova", "hdd", "vhd", "ami"]
COMPRESSED = ["qcow2", "vdi", "vmdk", "ova", "hdd"]
MiB = 1024 * 1024
TARGETS = {"build": 90.0, "boot": 60.0, "size": 100 * MiB, "size_aim": 64 * MiB}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
STAGE = re.compile(r"^\[(\d+)/(\d+)\] (.*): done in ([\d.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def wait_for(url: str, timeout: float = 30) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer") from None
            time.sleep(0.2)


def usage(path: Path) -> int:
    if path.is_dir():
        return sum(usage(p) for p in path.iterdir())
    return path.stat().st_blocks * 512


def export(
    out: Path, formats: list[str], endpoint: str | None
) -> tuple[float, dict[str, float], str]:
    extra = ["--endpoint-url", endpoint] if endpoint else []
    started = time.monotonic()
    result = run(
        BIN / "cvmbuild", "export", "--recipe", RECIPE, "--format", ",".join(formats),
        "--output", out, *extra, env=AWS_ENV,
    )  # fmt: skip
    wall = time.monotonic() - started
    stages = {}
    for line in result.stderr.splitlines():
        if m := STAGE.match(line):
            stages[m.group(3)] = float(m.group(4))
    digest = re.search(r"rootfs content sha256 (\w+)", result.stdout)
    return wall, stages, digest.group(1) if digest else "?"


def boot_times(image: Path, work: Path, boots: int) -> list[tuple[float, float]]:
    """(seconds to mounted, seconds to job exit) per boot, against a served repository."""
    src = work / "hello" / "bin"
    src.mkdir(parents=True)
    (src / "hello.py").write_text("print('hello from the repository')\n")
    run(BIN / "repo-server", "init", work / "repo", "--name", "bench.example.org")
    run(BIN / "cvmbuild", "publish", work / "hello", "--repo", work / "repo", "--path", "/sw/1",
        env={"CVMBUILD_CACHE_DIR": str(work / "statcache")})  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [BIN / "repo-server", "serve", work / "repo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    times = []
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        for _ in range(boots):
            result = run(
                BIN / "cvmbuild", "boot", image, "--repo-url", f"http://10.0.2.2:{port}",
                "--repo-key", work / "repo.keys" / "bench.example.org.pub",
                "--job", "python3 /cvmfs/sw.example.org/sw/1/bin/hello.py", "--timeout", "300",
            )  # fmt: skip
            m = re.search(r"after ([\d.]+) s; job exit 0 after ([\d.]+) s", result.stdout)
            if not m:
                raise SystemExit(f"unexpected boot output: {result.stdout}")
            times.append((float(m.group(1)), float(m.group(2))))
    finally:
        server.terminate()
        server.wait()
    return times


def verdict(value: float, target: float) -> str:
    return f"{value / target:.2f}× target ({'met' if value <= target else 'MISSED'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=3, help="boots to time (default 3)")
    parser.add_argument("--no-warmup", action="store_true", help="the package cache is warm")
    parser.add_argument("--output", type=Path, help="append the markdown to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the appliance build needs root (mmdebstrap --mode=root)")
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    port = free_port()
    moto = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(f"{endpoint}/moto-api/")
        first = None
        if not args.no_warmup:
            print("warming the package cache ...", file=sys.stderr)
            first = export(work / "warmup", ["raw"], None)[2]
        print("timed build in every format ...", file=sys.stderr)
        wall, stages, digest = export(work / "out", FORMATS, endpoint)
        print("booting the qcow2 ...", file=sys.stderr)
        boots = boot_times(work / "out" / "cvm-thin.qcow2", work / "boot", args.boots)
    finally:
        moto.terminate()
        moto.wait()
    out = work / "out"
    build = sum(seconds for name, seconds in stages.items() if not name.startswith("export "))
    lines = [
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f} at the end), QEMU TCG, warm package cache.",
        "",
        "| what | measured | against the target |",
        "| --- | ---: | --- |",
        f"| build, warm cache (stages 1–5) | {build:.1f} s | {verdict(build, TARGETS['build'])} |",
    ]
    for name, seconds in stages.items():
        if not name.startswith("export "):
            lines.append(f"| &nbsp; {name} | {seconds:.1f} s | |")
    for fmt in FORMATS:
        seconds = stages.get(f"export {fmt}", 0.0)
        path = out / ("cvm-thin.ami.json" if fmt == "ami" else f"cvm-thin.{fmt}")
        size = usage(path)
        if fmt == "ami":
            lines.append(f"| conversion ami (EBS direct upload to moto) | {seconds:.1f} s | |")
            continue
        target = verdict(size, TARGETS["size_aim"]) + " of 64 MiB" if fmt in COMPRESSED else ""
        lines.append(
            f"| conversion {fmt}: time, size on disk | {seconds:.1f} s, {size / MiB:.1f} MiB "
            f"| {target} |"
        )
    mounted = statistics.median(m for m, _ in boots)
    job = statistics.median(j for _, j in boots)
    lines += [
        f"| boot to repository mounted (median of {len(boots)}) | {mounted:.1f} s | |",
        f"| boot to job result (median of {len(boots)}) | {job:.1f} s "
        f"| {verdict(job, TARGETS['boot'])} |",
        f"| whole export, wall | {wall:.1f} s | |",
    ]
    if first is not None:
        same = "the same" if first == digest else f"DIFFERENT ({first[:12]} vs {digest[:12]})"
        lines += ["", f"Rootfs content hash of the two builds: {same} (`{digest[:16]}…`)."]
    text = "\n".join(lines) + "\n"
    emit(text, args.output)  # appends: --output docs/PERFORMANCE.md must not clobber it
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
