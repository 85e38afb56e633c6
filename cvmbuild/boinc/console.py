"""The appliance's console protocol, host side (pure): one `CVMAPPLIANCE: <message>`
line from the guest agent becomes one event.

The guest agent (cvmbuild/appliance/guest_agent.py) prints these lines; `cvmbuild boot`
and the VM wrapper read them through `parse`. Messages:

    agent started, uptime S s          -> Other
    user data from SOURCE: FORMAT, keys K1, K2  -> Other
    cache disk DEV: new|reused, U of S MiB used -> Other
    mounted NAME revision N at PATH    -> Mounted(name, revision)
    job start: CMD                     -> JobStart(command)
    job exit N after S s               -> JobExit(status)
    error: TEXT                        -> Error(text)
    no job to run                      -> NoJob
    heartbeat                          -> Heartbeat (every 30 s while the agent runs)
    progress F                         -> Progress(fraction), 0 <= F <= 1
    outputs written                    -> OutputsWritten (output disk synced, unmounted)
    powering off                       -> PoweringOff
    anything else                      -> Other(message)

The marker may appear mid-line (a job's unterminated output or a kernel message can
precede it on the serial console), so it is searched for, not matched at the start.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MARK = "CVMAPPLIANCE:"


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class Progress:
    fraction: float


@dataclass(frozen=True)
class JobStart:
    command: str


@dataclass(frozen=True)
class JobExit:
    status: int


@dataclass(frozen=True)
class Error:
    text: str


@dataclass(frozen=True)
class Mounted:
    name: str
    revision: int


@dataclass(frozen=True)
class NoJob:
    pass


@dataclass(frozen=True)
class OutputsWritten:
    pass


@dataclass(frozen=True)
class PoweringOff:
    pass


@dataclass(frozen=True)
class Other:
    """An agent message with no meaning for the host (agent started, mounting ...)."""

    message: str


Event = (
    Heartbeat | Progress | JobStart | JobExit | Error | Mounted | NoJob | OutputsWritten
    | PoweringOff | Other
)  # fmt: skip

_MOUNTED = re.compile(r"mounted (\S+) revision (\d+)")
_JOB_EXIT = re.compile(r"job exit (-?\d+)")
_PROGRESS = re.compile(r"progress (\S+)$")


def parse(line: str) -> Event | None:
    """The event a console line carries, or None if the guest agent did not print it."""
    at = line.find(MARK)
    if at < 0:
        return None
    message = line[at + len(MARK) :].strip()
    if message == "heartbeat":
        return Heartbeat()
    if m := _PROGRESS.match(message):
        fraction = _fraction(m.group(1))
        return Other(message) if fraction is None else Progress(fraction)
    if m := _MOUNTED.match(message):
        return Mounted(m.group(1), int(m.group(2)))
    if m := _JOB_EXIT.match(message):
        return JobExit(int(m.group(1)))
    if message.startswith("job start:"):
        return JobStart(message[len("job start:") :].strip())
    if message.startswith("error:"):
        return Error(message[len("error:") :].strip())
    if message.startswith("no job to run"):
        return NoJob()
    if message == "outputs written":
        return OutputsWritten()
    if message == "powering off":
        return PoweringOff()
    return Other(message)


def _fraction(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return min(1.0, max(0.0, value))
