"""The appliance as a BOINC task: what the VM wrapper costs beyond the appliance's own
boot, what a checkpoint (savevm) and a restore cost, and the disk a task uses beyond
the shared base image. Interleaved rounds on one machine, as ratios and differences.

Per round:
- direct: the same QEMU the wrapper runs (cvmbuild.boinc.vm.Vm), started by this
  script, from QEMU's start to the job's first output line on the console;
- wrapper: the real BOINC client (7.20.5) attached to the scheduler emulator of the
  tests (tests/boinc_project.py) runs the exported app; from the task's start (the
  slot's init_data.xml, written by the client just before it starts the wrapper) to
  the same first output line, and from the client's start;
- checkpoint: a counting job, savevm + quit mid-job (Vm.save_and_quit), the overlay's
  growth, then a restore until the job's next line.

Needs root (the export) unless --bundle names an existing `export --format boinc`.

    .venv/bin/python bench/boinc_bench.py [--bundle OUT/cvm-thin.boinc] [--rounds 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from appliance_bench import free_port, run, wait_for  # noqa: E402
from publish_bench import emit, machine_header  # noqa: E402

from cvmbuild.appliance import boot  # noqa: E402
from cvmbuild.boinc.vm import CONFIG_DRIVE, OUTPUT_DISK, OVERLAY, Vm  # noqa: E402
from tests.boinc_project import (  # noqa: E402
    EmulatedJob,
    InputFile,
    OutputFile,
    exported_app,
    scheduler_emulator,
)
from tests.boinc_running import running_client  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
MARK = "bench: first output"
TARGETS = {"overhead_s": 3.0, "checkpoint_s": 5.0, "restore_s": 5.0, "task_disk": 0.10}
COUNT = "n=0; while [ $n -lt 60 ]; do n=$((n+1)); echo count $n; sleep 1; done"


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


def task_disk(slot: Path) -> int:
    """What one task's slot holds beyond the shared base: overlay, output and config."""
    return sum(allocated(slot / name) for name in (OVERLAY, OUTPUT_DISK, CONFIG_DRIVE))


def wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every 20 ms; returns the time.time() at which check became true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.time()


def serve_repository(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """A repository with a small program, served on the loopback; (process, guest URL, key)."""
    src = work / "hello" / "bin"
    src.mkdir(parents=True)
    (src / "hello.py").write_text("print('hello')\n")
    run(BIN / "repo-server", "init", work / "repo", "--name", "sw.example.org")
    run(BIN / "cvmbuild", "publish", work / "hello", "--repo", work / "repo", "--path",
        "/sw/hello/1.0", env={"CVMBUILD_CACHE_DIR": str(work / "statcache")})  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "repo-server", "serve", work / "repo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(f"http://127.0.0.1:{port}/")
    key = (work / "repo.keys" / "sw.example.org.pub").read_text()
    return proc, f"http://10.0.2.2:{port}", key


def base_image(bundle: Path) -> Path:
    (image,) = bundle.glob("apps/*/*/*__qemu/*.qcow2")
    return image


def direct(base: Path, slot: Path, user_data: str) -> dict[str, float]:
    """QEMU started here: its start to the job's first output line, and the disk the
    finished task used beyond the base image."""
    slot.mkdir()
    vm = Vm(slot, base, 512, 1, True, 1024)
    vm.prepare(user_data, {})
    lines: list[str] = []

    def seen() -> bool:
        lines.extend(vm.new_console_lines())
        return any(MARK in line for line in lines)

    started = time.time()
    vm.start()
    try:
        first = wait(seen, 300, "the job's first line (direct)")
        wait(lambda: vm.exited() is not None, 120, "the VM to power off")
    finally:
        vm.kill()
    return {"direct_s": first - started, "task_disk": task_disk(slot) / allocated(base)}


def under_boinc(bundle: Path, work: Path, user_data: str) -> dict[str, float]:
    files, app_info = exported_app(bundle)
    job = EmulatedJob(
        name=work.name, app_name="cvm-thin", version_num=100, plan_class="qemu",
        inputs=(InputFile(f"{work.name}_user-data", user_data.encode(), "user-data"),),
        outputs=(OutputFile("result.txt"),),
    )  # fmt: skip
    with scheduler_emulator([job]) as project:
        client_start = time.time()
        with running_client(work / "client", project.master_url, files, app_info) as client:
            slot = client.dir / "slots" / "0"
            console = slot / "vm_console.log"
            first = wait(
                lambda: console.exists() and MARK in console.read_text(errors="replace"),
                600,
                "the job's first line under BOINC",
            )
            task_start = (slot / "init_data.xml").stat().st_mtime
            client.wait_exit(timeout=600)
        report = project.reports[job.result_name]
        if report.exit_status != 0:
            raise SystemExit(f"the BOINC task failed: {report.stderr_out}")
    return {"wrapper_s": first - task_start, "client_s": first - client_start}


def checkpoint(base: Path, slot: Path, user_data: str) -> dict[str, float]:
    slot.mkdir()
    vm = Vm(slot, base, 512, 1, True, 1024)
    vm.prepare(user_data, {})
    lines: list[str] = []

    def counted(n: int) -> Callable[[], bool]:
        def check() -> bool:
            lines.extend(vm.new_console_lines())
            return any(line.startswith(f"count {n}") for line in lines)

        return check

    vm.start()
    try:
        wait(counted(5), 300, "the job to count to 5")
        before = allocated(slot / OVERLAY)
        saved_s = vm.save_and_quit()
        state_bytes = allocated(slot / OVERLAY) - before
        task_bytes = task_disk(slot)
        counts = [int(line.split()[1]) for line in lines if line.startswith("count ")]
        started = time.time()
        vm.start()
        start_s = time.time() - started
        resumed = wait(counted(max(counts) + 1), 120, "the job's next line after the restore")
    finally:
        vm.kill()
    return {
        "checkpoint_s": saved_s,
        "restore_s": resumed - started,
        "restore_monitor_s": start_s,
        "state_mib": state_bytes / MiB,
        "checkpointed_task_disk": task_bytes / allocated(base),
    }


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(rows: list[dict[str, float]], base: Path) -> str:
    overhead = [r["wrapper_s"] - r["direct_s"] for r in rows]
    lines = [
        "",
        "### The appliance as a BOINC task (bench/boinc_bench.py)",
        "",
        *machine_header(base.parent),
        f"- base image {base.name}: {allocated(base) / MiB:.1f} MiB; 512 MiB guest, TCG, "
        f"{len(rows)} interleaved rounds (median; min-max)",
        "",
        "| measure | median | min-max | target |",
        "| --- | --- | --- | --- |",
    ]

    def row(name: str, values: list[float], unit: str, target: str) -> None:
        fmt = "{:.2f}" if unit == "s" else "{:.1f}"
        lines.append(
            f"| {name} | {fmt.format(statistics.median(values))} {unit} | "
            f"{fmt.format(min(values))}-{fmt.format(max(values))} {unit} | {target} |"
        )

    row("direct QEMU: start to the job's first line", [r["direct_s"] for r in rows], "s", "")
    row("wrapper: task start to the job's first line", [r["wrapper_s"] for r in rows], "s", "")
    row("wrapper overhead (difference)", overhead, "s", f"<= {TARGETS['overhead_s']:.0f} s")
    row("client start to the job's first line", [r["client_s"] for r in rows], "s", "")
    row("checkpoint (savevm + quit) mid-job", [r["checkpoint_s"] for r in rows], "s", "<= 5 s")
    row("restore until the job's next line", [r["restore_s"] for r in rows], "s", "<= 5 s")
    row("saved VM state in the overlay", [r["state_mib"] for r in rows], "MiB", "")
    pct = [100 * r["task_disk"] for r in rows]
    row("task disk beyond the base, no checkpoint", pct, "%", "<= 10 %")
    pct = [100 * r["checkpointed_task_disk"] for r in rows]
    row("task disk beyond the base, with a checkpoint", pct, "%", "")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="an `export --format boinc` bundle")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="append the report to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="boinc-bench-") as tmp:
        work = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            run(BIN / "cvmbuild", "export", "--recipe", ROOT / "recipes" / "thin.toml",
                "--format", "boinc", "--output", work / "out")  # fmt: skip
            bundle = work / "out" / "cvm-thin.boinc"
        base = base_image(bundle)
        server, url, key = serve_repository(work)
        first = boot.user_data(url, key, None, f"echo '{MARK}'; echo done > result.txt")
        count = boot.user_data(url, key, None, COUNT)
        rows: list[dict[str, float]] = []
        try:
            for n in range(args.rounds):
                row = direct(base, work / f"direct{n}", first)
                row |= under_boinc(bundle, work / f"boinc{n}", first)
                row |= checkpoint(base, work / f"ckpt{n}", count)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
        finally:
            server.terminate()
            server.wait()
        emit(report(rows, base), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
