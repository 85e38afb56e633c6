"""The BOINC application API, by ctypes on the real `libboinc_api.so.7` (Debian's
libboinc-app7): no Python binding is maintained, and the shared-memory protocol with
the client is BOINC's to speak, not ours. Also reads the slot's `init_data.xml`.

Structure layouts and calls follow BOINC 7.20's `api/boinc_api.h`; the C++-only calls
(temporary exit, finish with a message) are reached by their mangled names.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

LIBRARY = "libboinc_api.so.7"
RESOLVE_LIBRARY = "libboinc.so.7"

# BOINC's exit statuses (lib/error_numbers.h) that a wrapper reports.
EXIT_ABORTED_BY_CLIENT = 194
EXIT_CHILD_FAILED = 195
EXIT_TIME_LIMIT_EXCEEDED = 197
EXIT_INIT_FAILURE = 206
LAST_STATUS_WAIT_S = 3.0  # the client empties the status channel about once a second


class BoincApiError(Exception):
    """The BOINC API library is missing or refused a call."""


class _Options(ctypes.Structure):
    _fields_ = [
        ("normal_thread_priority", ctypes.c_int),
        ("main_program", ctypes.c_int),
        ("check_heartbeat", ctypes.c_int),
        ("handle_process_control", ctypes.c_int),
        ("send_status_msgs", ctypes.c_int),
        ("direct_process_action", ctypes.c_int),
        ("multi_thread", ctypes.c_int),
        ("multi_process", ctypes.c_int),
    ]


class _Status(ctypes.Structure):
    _fields_ = [
        ("no_heartbeat", ctypes.c_int),
        ("suspended", ctypes.c_int),
        ("quit_request", ctypes.c_int),
        ("reread_init_data_file", ctypes.c_int),
        ("abort_request", ctypes.c_int),
        ("working_set_size", ctypes.c_double),
        ("max_working_set_size", ctypes.c_double),
        ("network_suspended", ctypes.c_int),
    ]


@dataclass(frozen=True)
class BoincStatus:
    no_heartbeat: bool = False
    suspended: bool = False
    quit_request: bool = False
    reread_init_data_file: bool = False
    abort_request: bool = False
    network_suspended: bool = False


@dataclass(frozen=True)
class InitData:
    """What a task needs from the client's `init_data.xml` (absent fields: defaults)."""

    project_dir: str = ""
    slot: int = 0
    wu_name: str = ""
    result_name: str = ""
    ncpus: float = 1.0
    rsc_memory_bound: float = 0.0
    checkpoint_period: float = 300.0
    fraction_done_start: float = 0.0
    fraction_done_end: float = 1.0


def read_init_data(path: Path) -> InitData:
    """Parse init_data.xml; a missing file (standalone runs) gives the defaults."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        return InitData()
    except ET.ParseError as exc:
        raise BoincApiError(f"{path}: not valid XML: {exc}") from exc
    values: dict[str, object] = {}
    for field in dataclasses.fields(InitData):
        node = root.find(field.name)
        if node is None or node.text is None:
            continue
        kind: type[object] = type(field.default)
        try:
            values[field.name] = (
                int(float(node.text))
                if kind is int
                else float(node.text)
                if kind is float
                else node.text.strip()
            )
        except ValueError as exc:
            raise BoincApiError(f"{path}: <{field.name}> is not a {kind.__name__}") from exc
    return InitData(**values)  # type: ignore[arg-type]


def log(message: str) -> None:
    """One line in the task's stderr.txt, stamped like the BOINC library's own lines."""
    print(f"{time.strftime('%H:%M:%S')} ({os.getpid()}): {message}", file=sys.stderr, flush=True)


def _flush() -> None:
    # The library exits with exit(3), which flushes C stdio but not Python's buffers.
    # A closed or broken stream has nothing left worth saving.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _load(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        raise BoincApiError(
            f"cannot load {name} ({exc}): install BOINC's application library with "
            "`apt-get install libboinc-app7`"
        ) from exc


class BoincApi:
    """One process's connection to the BOINC client (or standalone, without one)."""

    def __init__(self, library: str | None = None):
        self.lib = _load(library or LIBRARY)
        self.base = _load(RESOLVE_LIBRARY)
        self._client_pid: int | None = None
        self._unsent: tuple[float, float, float] | None = None
        lib = self.lib
        lib.boinc_init_options.argtypes = [ctypes.POINTER(_Options)]
        lib.boinc_get_status.argtypes = [ctypes.POINTER(_Status)]
        lib.boinc_fraction_done.argtypes = [ctypes.c_double]
        lib.boinc_report_app_status.argtypes = [ctypes.c_double] * 3
        lib.boinc_finish.argtypes = [ctypes.c_int]
        self._finish_message = lib._Z20boinc_finish_messageiPKcb
        self._finish_message.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_bool]
        self._temporary_exit = lib._Z20boinc_temporary_exitiPKcb
        self._temporary_exit.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_bool]
        self.base.boinc_resolve_filename.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
        ]

    def init_wrapper(self) -> None:
        """Initialise as a wrapper: we act on suspend, quit and abort ourselves (the
        library only sets the flags) and the client's heartbeat is checked."""
        options = _Options(
            main_program=1,
            check_heartbeat=1,
            handle_process_control=1,
            # 0 as in BOINC's wrapper and vboxwrapper: with 1 the library's timer
            # thread reports this process's own CPU time every second, racing
            # report_status (one message slot) with the task's real figures.
            send_status_msgs=0,
            direct_process_action=0,
        )
        rc = self.lib.boinc_init_options(ctypes.byref(options))
        if rc != 0:
            raise BoincApiError(f"boinc_init_options failed with status {rc}")
        # The client forks us directly; the library looks for it only every 10 s.
        self._client_pid = None if self.is_standalone() else os.getppid()

    def status(self) -> BoincStatus:
        raw = _Status()
        self.lib.boinc_get_status(ctypes.byref(raw))
        orphaned = self._client_pid is not None and os.getppid() != self._client_pid
        return BoincStatus(
            # A new parent means the client died (the library would notice within
            # 10 s, measured 10.3 s to a dead wrapper; this takes one poll).
            no_heartbeat=bool(raw.no_heartbeat) or orphaned,
            suspended=bool(raw.suspended),
            quit_request=bool(raw.quit_request),
            reread_init_data_file=bool(raw.reread_init_data_file),
            abort_request=bool(raw.abort_request),
            network_suspended=bool(raw.network_suspended),
        )

    def is_standalone(self) -> bool:
        return bool(self.lib.boinc_is_standalone())

    def resolve(self, logical: str) -> str:
        """The physical file behind a logical name (a `<soft_link>` file in the slot),
        or the name itself when there is no link (standalone)."""
        out = ctypes.create_string_buffer(4096)
        rc = self.base.boinc_resolve_filename(os.fsencode(logical), out, len(out))
        if rc != 0:
            raise BoincApiError(f"cannot resolve the file name {logical!r} (status {rc})")
        return os.fsdecode(out.value)

    def report_status(self, cpu_time: float, checkpoint_cpu_time: float, fraction: float) -> bool:
        """Send CPU times and progress to the client; False when its channel still
        held the previous message (the client reads it about once a second): then
        this one is kept, and finish or temporary_exit delivers it before leaving."""
        status = (cpu_time, checkpoint_cpu_time, min(1.0, max(0.0, fraction)))
        sent: bool = self.lib.boinc_report_app_status(*status) == 0
        self._unsent = None if sent else status
        return sent

    def _deliver_last_status(self) -> None:
        # Without this a task's final CPU time could be lost: reported less than a
        # second after the loop's last report, it found the channel full.
        deadline = time.monotonic() + LAST_STATUS_WAIT_S
        while self._unsent is not None and time.monotonic() < deadline:
            time.sleep(0.1)
            if self.lib.boinc_report_app_status(*self._unsent) == 0:
                self._unsent = None

    def fraction_done(self, fraction: float) -> None:
        self.lib.boinc_fraction_done(min(1.0, max(0.0, fraction)))

    def time_to_checkpoint(self) -> bool:
        return bool(self.lib.boinc_time_to_checkpoint())

    def checkpoint_completed(self) -> None:
        self.lib.boinc_checkpoint_completed()

    def finish(self, status: int, message: str | None = None, is_notice: bool = False) -> NoReturn:
        """Report the task done (status 0) or failed, and exit the process. The message
        also goes to stderr (the slot's stderr.txt, which the project receives)."""
        if message is not None:
            log(message)
        self._deliver_last_status()
        _flush()
        if message is None:
            self.lib.boinc_finish(status)
        else:
            self._finish_message(status, message.encode(), is_notice)
        os._exit(status)  # not reached: the library exits

    def temporary_exit(self, delay_s: int, reason: str, is_notice: bool = False) -> NoReturn:
        """Exit so that the client restarts the task after delay_s seconds."""
        log(f"temporary exit ({reason}); restart in {delay_s} s")
        self._deliver_last_status()
        _flush()
        self._temporary_exit(delay_s, reason.encode(), is_notice)
        os._exit(0)  # not reached
