"""Progress of long work on stderr, for every program: a tqdm bar on a terminal, and
elsewhere (CI logs, cron mail) one plain line every few seconds."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

from cvmfs_client.console import human

INTERVAL_ENV = "CVMFS_PROGRESS_INTERVAL"  # seconds between lines without a terminal
DEFAULT_INTERVAL_S = 5.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class Progress:
    """Counts work done out of total (unit "B" counts bytes); a context manager.
    update() may be called from several threads."""

    def __init__(
        self, desc: str, total: int, unit: str = "B", *, enabled: bool = True,
        stream: TextIO | None = None,
    ):  # fmt: skip
        self.desc = desc
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.done = 0
        self._bar: Any = None
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()
        self._interval = _interval()
        self._lines = enabled and total > 0
        if self._lines and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the appliance carries the client without it: lines then
                return
            self._lines = False
            self._bar = tqdm(
                total=total, unit=unit, unit_scale=unit == "B", desc=desc, leave=False,
                file=self.stream,
            )  # fmt: skip

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self._lines:
            return
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            line = self._line(now)
        print(line, file=self.stream, flush=True)

    def _line(self, now: float) -> str:
        if self.unit == "B":
            amount = f"{human(self.done)} of {human(self.total)}"
        else:
            amount = f"{self.done} of {self.total} {self.unit}"
        percent = 100 * self.done / self.total
        return f"{self.desc}: {amount} ({percent:.0f}%), {now - self._start:.0f} s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
