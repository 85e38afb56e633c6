"""The job file, parsed once into typed values: `<vm_job>` (our VM wrapper) → `VmJob`,
or BOINC's plain wrapper `<job_desc>` with `<task>` entries → `HostJob` (host programs).

Pure: text in, frozen dataclasses out. Every mistake (an unknown or repeated tag, a
value of the wrong type, a missing application) is a `JobFileError` whose one-line
message names the file and the tag: a typo must never be silently ignored.

`<vm_job>` tags (vboxwrapper's names where the meaning is the same): see `VmJob` and
docs/BOINC.md. `<job_desc>` follows BOINC's `samples/wrapper/wrapper.cpp` (7.20) for
the tags listed in `HostTask`; its daemons, `exec_dir`, `multi_process`, zipped
inputs and outputs, and graphics are not supported and are rejected by name.
"""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, TypeVar

DEFAULT_IMAGE = "vm_image.qcow2"


class JobFileError(Exception):
    """The job file is not one this wrapper can run."""


@dataclass(frozen=True)
class VmJob:
    """A `<vm_job>`: boot the appliance under QEMU (cvmbuild.boinc.vm_task)."""

    image: str = DEFAULT_IMAGE  # logical name of the read-only base image
    memory_size_mb: int = 512
    cpus: int = 1  # capped by init_data's ncpus at run time
    job_duration: float = 0.0  # seconds; >0: progress by time and a clean stop then
    minimum_heartbeat_interval: float = 600.0  # seconds without a console line: failed
    minimum_checkpoint_interval: float = 600.0  # seconds between two savevm
    enable_vm_savestate_usage: bool = False  # quit saves the VM instead of a cold restart
    enable_network: bool = True
    command_line: str = ""  # the job command in the guest
    user_data: str = ""  # inline TOML user data
    user_data_file: str = ""  # logical name of a work unit file with user data
    copy_to_guest: tuple[str, ...] = ()  # logical names, repeated tag
    copy_from_guest: tuple[str, ...] = ()  # file names in the job's directory, repeated tag
    output_disk_mb: int = 1024
    copilot_url: str = ""  # reserved for issue 11


@dataclass(frozen=True)
class HostTask:
    """One `<task>` of BOINC's plain wrapper: a host program run to completion."""

    application: str = ""  # logical name (resolved through the slot's soft links)
    command_line: str = ""  # split like a shell would (shlex), no expansion
    stdin_filename: str = ""  # logical names; empty: inherit the wrapper's
    stdout_filename: str = ""
    stderr_filename: str = ""
    setenv: tuple[tuple[str, str], ...] = ()  # added to the wrapper's environment
    weight: float = 1.0  # share of the job's progress
    fraction_done_filename: str = ""  # the task writes its progress here (last number)
    checkpoint_filename: str = ""  # a change of its mtime means the task checkpointed
    time_limit: float = 0.0  # seconds; >0: the task is stopped then and counts as done


@dataclass(frozen=True)
class HostJob:
    """A `<job_desc>`: host tasks run in order (cvmbuild.boinc.host_tasks)."""

    tasks: tuple[HostTask, ...]


# Tags BOINC's own wrapper knows that this one does not implement: named in the error
# so that an operator porting a job.xml learns why, rather than "unknown tag".
_UNSUPPORTED = {
    "daemon",
    "exec_dir",
    "multi_process",
    "append_cmdline_args",
    "forward_slashes",
    "priority",
    "unzip_input",
    "zip_output",
    "enable_graphics_support",
}

_REPEATED = {"copy_to_guest", "copy_from_guest", "setenv"}

Job = TypeVar("Job", VmJob, HostTask)


def parse(text: str | bytes, source: str = "job file") -> VmJob | HostJob:
    """Parse a job file; `source` (its path) prefixes every error message."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise JobFileError(f"{source}: not well-formed XML ({exc})") from exc
    if root.tag == "vm_job":
        return _fields(VmJob, root, source)
    if root.tag == "job_desc":
        return _host_job(root, source)
    raise JobFileError(
        f"{source}: the root element is <{root.tag}>; expected <vm_job> or <job_desc>"
    )


def _host_job(root: ET.Element, source: str) -> HostJob:
    tasks: list[HostTask] = []
    for child in root:
        if child.tag != "task":
            raise _unknown(source, child.tag, "job_desc")
        where = f"{source}: task {len(tasks) + 1}"
        task = _fields(HostTask, child, where)
        if not task.application:
            raise JobFileError(f"{where}: <application> is missing")
        tasks.append(task)
    if not tasks:
        raise JobFileError(f"{source}: <job_desc> has no <task>")
    if sum(task.weight for task in tasks) <= 0:
        raise JobFileError(f"{source}: the tasks' <weight>s add up to 0")
    return HostJob(tuple(tasks))


def _unknown(source: str, tag: str, parent: str) -> JobFileError:
    if tag in _UNSUPPORTED:
        return JobFileError(
            f"{source}: <{tag}> (BOINC's wrapper) is not supported by this wrapper; "
            "remove it from the job file"
        )
    return JobFileError(f"{source}: unknown tag <{tag}> in <{parent}>")


def _fields(kind: type[Job], element: ET.Element, source: str) -> Job:
    """Fill the dataclass `kind` from the noderen of `element`, each field from the
    tag of the same name, converted to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    values: dict[str, Any] = {}
    node: ET.Element
    for node in element:
        field = fields.get(node.tag)
        if field is None:
            raise _unknown(source, node.tag, element.tag)
        if len(node):
            raise JobFileError(f"{source}: <{node.tag}> must hold text, not elements")
        text = (node.text or "").strip()
        value = _convert(field.type, text, f"{source}: <{node.tag}>")
        if node.tag in _REPEATED:
            values[node.tag] = (*values.get(node.tag, ()), value)
        elif node.tag in values:
            raise JobFileError(f"{source}: <{node.tag}> is given twice")
        else:
            values[node.tag] = value
    return kind(**values)


def _convert(annotation: object, text: str, where: str) -> Any:
    # Annotations are strings (from __future__ import annotations).
    kind = str(annotation)
    if kind == "str":
        return text
    if kind == "bool":
        return _boolean(text, where)
    if kind == "int":
        try:
            number = int(text)
        except ValueError:
            raise JobFileError(f"{where} must be a whole number, not {text!r}") from None
        if number <= 0:
            raise JobFileError(f"{where} must be positive, not {number}")
        return number
    if kind == "float":
        try:
            seconds = float(text)
        except ValueError:
            raise JobFileError(f"{where} must be a number, not {text!r}") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise JobFileError(f"{where} must be a number >= 0, not {text!r}")
        return seconds
    if kind == "tuple[str, ...]":
        if not text:
            raise JobFileError(f"{where} must name a file")
        return text
    if kind == "tuple[tuple[str, str], ...]":
        name, equals, value = text.partition("=")
        if not equals or not name or name != name.strip():
            raise JobFileError(f"{where} must be NAME=VALUE, not {text!r}")
        return (name, value)
    raise AssertionError(f"no conversion for {kind}")  # a new field needs one


def _boolean(text: str, where: str) -> bool:
    # `<tag/>` alone means yes, as in BOINC's XML_PARSER::parse_bool.
    if text.lower() in ("", "1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise JobFileError(f"{where} must be 0 or 1 (or empty for yes), not {text!r}")
