"""A BOINC scheduler EMULATOR for tests: just enough of a project's scheduler, download
and upload protocol (as the real client 7.20.5 speaks it) to take jobs through the
whole loop: attach, download, run, upload, report. It is NOT a BOINC server: there is
no database, no validator, no assimilator, no code signing, and apps are only run under
the anonymous platform (the client takes the app from `app_info.xml` in its project
directory; an `<app_version>` in a reply would be ignored, client/cs_scheduler.cpp).

Measured against the real client in shared/notes/boinc-qemu-copilot.md §1. What it
serves, on 127.0.0.1 and a free port (`http.server` in a thread):

- `/` (the master URL): an HTML page with `<scheduler>…/scheduler</scheduler>`;
- `/scheduler`: each `scheduler_request` is answered with a `scheduler_reply` that
  carries the `<app>`s, every job not yet sent (when the client asks for work):
  `<file_info>` of the inputs (download URL, md5, nbytes), `<workunit>`, the output
  `<file_info>` (upload URL containing `file_upload_handler`, or the client treats it
  as a download, client/client_types.cpp) and `<result>`; and a `<result_ack>` for
  each result the request reports, whose exit status and stderr are recorded;
- `/download/NAME`: the input files;
- `/file_upload_handler`: BOINC's upload protocol (`<get_file_size>`, then
  `<file_upload>` with the bytes after `<data>\\n`); the bytes are recorded.
"""

from __future__ import annotations

import hashlib
import html
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PLATFORM = "x86_64-pc-linux-gnu"
RESULT_COMPUTE_ERROR = 3  # the client's result states (client/result.h)
RESULT_FILES_UPLOADED = 5
RESULT_ABORTED = 6


@dataclass(frozen=True)
class InputFile:
    name: str  # physical name (BOINC files are immutable: one name, one content)
    data: bytes
    open_name: str  # the logical name the app resolves
    copy_file: bool = False


@dataclass(frozen=True)
class OutputFile:
    open_name: str  # the logical name the app writes; physical name is RESULT_open_name
    max_nbytes: int = 64 * 1024 * 1024
    copy_file: bool = False


@dataclass(frozen=True)
class EmulatedJob:
    """One work unit with one result (named NAME_0) for an anonymous-platform app."""

    name: str
    app_name: str
    version_num: int
    plan_class: str = ""
    platform: str = PLATFORM
    inputs: tuple[InputFile, ...] = ()
    outputs: tuple[OutputFile, ...] = ()
    command_line: str = ""
    # Bounds, generous so that a loaded test machine never trips them: fpops_bound/flops
    # is the time limit and the slot's disk use is checked against disk_bound while the
    # task runs; memory_bound only gates the start (7.20.5 never aborts on it,
    # client/app_control.cpp), and a VM task's working set includes QEMU's.
    rsc_fpops_est: float = 1e10
    rsc_fpops_bound: float = 1e16
    rsc_memory_bound: float = 1e9
    rsc_disk_bound: float = 4e9
    delay_bound: float = 86400

    @property
    def result_name(self) -> str:
        return f"{self.name}_0"

    def output_name(self, out: OutputFile) -> str:
        return f"{self.result_name}_{out.open_name}"


@dataclass(frozen=True)
class Report:
    """What the client reported for one result."""

    result_name: str
    exit_status: int
    state: int  # the client's result state (client/result.h)
    stderr_out: str
    elapsed_s: float


def _tag(text: str, name: str) -> str | None:
    match = re.search(rf"<{name}>(.*?)</{name}>", text, re.S)
    return match.group(1).strip() if match else None


def _stderr(block: str) -> str:
    match = re.search(r"<stderr_out>.*?<!\[CDATA\[(.*?)\]\]>", block, re.S)
    return match.group(1).strip() if match else ""


def _file_info_download(url: str, f: InputFile) -> str:
    return (
        "<file_info>\n"
        f"    <name>{f.name}</name>\n"
        f"    <url>{url}/download/{f.name}</url>\n"
        f"    <md5_cksum>{hashlib.md5(f.data).hexdigest()}</md5_cksum>\n"
        f"    <nbytes>{len(f.data)}</nbytes>\n"
        "</file_info>\n"
    )


def _file_ref(name: str, open_name: str, copy_file: bool) -> str:
    copy = "    <copy_file/>\n" if copy_file else ""
    return (
        f"    <file_ref>\n        <file_name>{name}</file_name>\n"
        f"        <open_name>{open_name}</open_name>\n{copy}    </file_ref>\n"
    )


def job_reply(url: str, job: EmulatedJob, now: float) -> str:
    """The part of a scheduler_reply that hands one job to the client."""
    parts = [_file_info_download(url, f) for f in job.inputs]
    parts.append(
        "<workunit>\n"
        f"    <name>{job.name}</name>\n"
        f"    <app_name>{job.app_name}</app_name>\n"
        f"    <version_num>{job.version_num}</version_num>\n"
        f"    <command_line>{html.escape(job.command_line)}</command_line>\n"
        f"    <rsc_fpops_est>{job.rsc_fpops_est:.0f}</rsc_fpops_est>\n"
        f"    <rsc_fpops_bound>{job.rsc_fpops_bound:.0f}</rsc_fpops_bound>\n"
        f"    <rsc_memory_bound>{job.rsc_memory_bound:.0f}</rsc_memory_bound>\n"
        f"    <rsc_disk_bound>{job.rsc_disk_bound:.0f}</rsc_disk_bound>\n"
        + "".join(_file_ref(f.name, f.open_name, f.copy_file) for f in job.inputs)
        + "</workunit>\n"
    )
    for out in job.outputs:
        parts.append(
            "<file_info>\n"
            f"    <name>{job.output_name(out)}</name>\n"
            "    <generated_locally/>\n    <upload_when_present/>\n"
            f"    <max_nbytes>{out.max_nbytes}</max_nbytes>\n"
            f"    <url>{url}/file_upload_handler</url>\n"
            "</file_info>\n"
        )
    plan = f"    <plan_class>{job.plan_class}</plan_class>\n" if job.plan_class else ""
    parts.append(
        "<result>\n"
        f"    <name>{job.result_name}</name>\n"
        f"    <wu_name>{job.name}</wu_name>\n"
        f"    <report_deadline>{now + job.delay_bound:.0f}</report_deadline>\n"
        f"    <platform>{job.platform}</platform>\n"
        f"    <version_num>{job.version_num}</version_num>\n{plan}"
        + "".join(_file_ref(job.output_name(o), o.open_name, o.copy_file) for o in job.outputs)
        + "</result>\n"
    )
    return "".join(parts)


def _data_server_reply(status: int, more: str = "") -> str:
    """The upload handler's answer: status 0 ok, -1 permanent failure (file_xfer.cpp)."""
    return f"<data_server_reply>\n<status>{status}</status>\n{more}</data_server_reply>\n"


def reported_results(request: str) -> list[Report]:
    """The `<result>` elements of a scheduler_request (finished tasks being reported;
    tasks in progress are `<other_result>`)."""
    reports = []
    for block in re.findall(r"<result>(.*?)\n</result>", request, re.S):
        reports.append(
            Report(
                result_name=_tag(block, "name") or "",
                exit_status=int(_tag(block, "exit_status") or 0),
                state=int(_tag(block, "state") or 0),
                stderr_out=_stderr(block),
                elapsed_s=float(_tag(block, "final_elapsed_time") or 0),
            )
        )
    return reports


@dataclass
class EmulatorState:
    jobs: list[EmulatedJob]
    project_name: str
    url: str = ""
    sent: set[str] = field(default_factory=set)
    reports: dict[str, Report] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apps(self) -> list[str]:
        return sorted({j.app_name for j in self.jobs})

    def scheduler_reply(self, request: str) -> str:
        now = time.time()
        with self.lock:
            self.requests.append(request)
            acks = []
            for report in reported_results(request):
                self.reports[report.result_name] = report
                acks.append(report.result_name)
            wants_work = float(_tag(request, "work_req_seconds") or 0) > 0 or (
                float(_tag(request, "cpu_req_secs") or 0) > 0
            )
            new = [j for j in self.jobs if j.name not in self.sent] if wants_work else []
            self.sent.update(j.name for j in new)
        body = [
            "<scheduler_reply>\n<scheduler_version>720</scheduler_version>\n",
            f"<project_name>{self.project_name}</project_name>\n",
            f"<master_url>{self.url}/</master_url>\n",
            "<request_delay>1</request_delay>\n",
        ]
        body += [
            f"<app>\n    <name>{a}</name>\n    <user_friendly_name>{a}</user_friendly_name>\n"
            "</app>\n"
            for a in self.apps()
        ]
        body += [job_reply(self.url, j, now) for j in new]
        body += [f"<result_ack>\n    <name>{n}</name>\n</result_ack>\n" for n in acks]
        body.append("</scheduler_reply>\n")
        return "".join(body)

    def upload(self, body: bytes) -> str:
        head, sep, data = body.partition(b"<data>\n")
        text = head.decode("utf-8", "replace")
        if name := _tag(text, "get_file_size"):
            with self.lock:
                size = len(self.uploads.get(name, b""))
            return _data_server_reply(0, f"<file_size>{size}</file_size>\n")
        info = _tag(text, "file_info") or ""
        name = _tag(info, "name")
        if not sep or not name:
            return _data_server_reply(-1, "<message>not a file upload</message>\n")
        offset = int(float(_tag(text, "offset") or 0))
        nbytes = int(float(_tag(text, "nbytes") or len(data)))
        with self.lock:
            self.uploads[name] = (self.uploads.get(name, b"")[:offset] + data)[:nbytes]
        return _data_server_reply(0)


def _handler(state: EmulatorState) -> type[BaseHTTPRequestHandler]:
    downloads = {f.name: f.data for j in state.jobs for f in j.inputs}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # the client's own log says what it asked for

        def _send(self, status: int, body: bytes, kind: str = "text/xml") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                page = (
                    f"<html><head><title>{state.project_name}</title></head><body>\n"
                    f"<!-- a BOINC scheduler EMULATOR for tests, not a BOINC server -->\n"
                    f"<scheduler>{state.url}/scheduler</scheduler>\n</body></html>\n"
                )
                self._send(200, page.encode(), "text/html")
            elif self.path.startswith("/download/") and self.path[10:] in downloads:
                self._send(200, downloads[self.path[10:]], "application/octet-stream")
            else:
                self._send(404, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/scheduler":
                reply = state.scheduler_reply(body.decode("utf-8", "replace"))
                self._send(200, reply.encode())
            elif self.path == "/file_upload_handler":
                self._send(200, state.upload(body).encode())
            else:
                self._send(404, b"not found\n", "text/plain")

    return Handler


class SchedulerEmulator:
    """The emulator, serving until stopped; `url` is the project's master URL (no
    trailing slash; the client canonicalises it to URL + "/")."""

    def __init__(self, jobs: list[EmulatedJob], project_name: str = "cvm-test-emulator"):
        self.state = EmulatorState(list(jobs), project_name)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = self.state.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def master_url(self) -> str:
        return self.url + "/"

    @property
    def reports(self) -> dict[str, Report]:
        with self.state.lock:
            return dict(self.state.reports)

    @property
    def uploads(self) -> dict[str, bytes]:
        with self.state.lock:
            return dict(self.state.uploads)

    @property
    def sent(self) -> set[str]:
        with self.state.lock:
            return set(self.state.sent)

    def start(self) -> SchedulerEmulator:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextmanager
def scheduler_emulator(jobs: list[EmulatedJob]) -> Iterator[SchedulerEmulator]:
    emulator = SchedulerEmulator(jobs).start()
    try:
        yield emulator
    finally:
        emulator.stop()


def escape_project_url(url: str) -> str:
    """The client's project directory name for a master URL (lib/url.cpp
    escape_project_url: scheme dropped, other than [A-Za-z0-9._-] -> '_', one trailing
    '_' dropped)."""
    rest = url.split("://", 1)[-1]
    escaped = re.sub(r"[^A-Za-z0-9._-]", "_", rest)
    return escaped[:-1] if escaped.endswith("_") else escaped


def exported_app(bundle: Path) -> tuple[list[Path], Path]:
    """The anonymous-platform app of an `export --format boinc` bundle (NAME.boinc/):
    the files its app_info.xml names, found in the app version directories, and the
    app_info.xml itself: what attach_anonymous installs."""
    app_info = bundle / "app_info.xml"
    names = re.findall(r"<file_info>\s*<name>([^<]+)</name>", app_info.read_text())
    found = {p.name: p for p in (bundle / "apps").glob("*/*/*/*") if p.name in names}
    missing = set(names) - set(found)
    assert not missing, f"{app_info} names files the bundle lacks: {sorted(missing)}"
    return [found[n] for n in names], app_info


def attach_anonymous(
    data_dir: Path, master_url: str, app_files: list[Path], app_info: Path
) -> Path:
    """Prepare a client data directory attached to the project with an anonymous-platform
    app: the account file (the client then fetches the master page and asks the
    scheduler for work) and projects/<escaped url>/ with app_info.xml and its files.
    Returns the project directory."""
    escaped = escape_project_url(master_url)
    (data_dir / f"account_{escaped}.xml").write_text(
        f"<account>\n    <master_url>{master_url}</master_url>\n"
        "    <authenticator>emulated</authenticator>\n</account>\n"
    )
    project = data_dir / "projects" / escaped
    project.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(app_info, project / "app_info.xml")
    for path in app_files:
        shutil.copy2(path, project / path.name)
    return project
