"""A small client for QEMU's machine protocol (QMP) over a unix socket.

`Qmp(path)` reads the greeting and negotiates capabilities; `execute(command, **args)`
returns the command's "return" value or raises QmpError with QEMU's own error text;
asynchronous events are skipped; `hmp(text)` runs a human monitor command (savevm,
loadvm), whose failures come back as text and are raised as QmpError too. Every read
has a deadline, so a hung QEMU cannot hang the wrapper.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any


class QmpError(Exception):
    """A QMP command failed, or QEMU did not answer in time."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class Qmp:
    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._buffer = b""
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(os.fspath(path))
            greeting = self._read_message(time.monotonic() + timeout, "greeting", timeout)
            if "QMP" not in greeting:
                raise QmpError(f"{path}: not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run one command and return its result; QmpError carries QEMU's description."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        seconds = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        try:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"{command}: QEMU's monitor is gone ({exc})") from exc
        while True:
            reply = self._read_message(deadline, command, seconds)
            if reply.get("id") != self._next_id:
                continue  # an event, or the answer to a command that timed out earlier
            if "error" in reply:
                error = reply["error"]
                raise QmpError(f"{command}: {error.get('desc', error)}", error.get("class", ""))
            return reply.get("return")

    def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """A human monitor command's output. Commands such as savevm report failure
        only in that text ("Error: ..."), which is raised here."""
        output = self.execute("human-monitor-command", timeout, **{"command-line": command_line})
        text = str(output or "")
        for line in text.splitlines():
            if line.startswith("Error:") or line.startswith("Error "):
                raise QmpError(f"{command_line}: {line.removeprefix('Error:').strip()}")
        return text

    def _read_message(self, deadline: float, command: str, seconds: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError(f"{command}: no answer from QEMU within {seconds:g} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QmpError(f"{command}: QEMU's monitor is gone ({exc})") from exc
            if not chunk:
                raise QmpError(f"{command}: QEMU closed its monitor")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"{command}: QEMU sent something that is not JSON: {line!r}") from exc
        if not isinstance(message, dict):
            raise QmpError(f"{command}: QEMU sent {message!r}")
        return message
