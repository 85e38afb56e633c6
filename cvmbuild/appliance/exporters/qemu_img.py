"""qemu-img, the converter every disk format but the OVA archive and AMI goes through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cvmbuild.appliance.process import run


def convert(
    source: Path, target: Path, fmt: str, options: str = "", *, source_fmt: str = "raw",
    compress: bool = False,
) -> Path:  # fmt: skip
    target.unlink(missing_ok=True)
    command: list[str | Path] = ["qemu-img", "convert", "-f", source_fmt, "-O", fmt]
    if options:
        command += ["-o", options]
    if compress:
        command.append("-c")
    run([*command, source, target])
    return target


def info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    command: list[str | Path] = ["qemu-img", "info", "--output=json"]
    if fmt:
        command += ["-f", fmt]
    result: dict[str, Any] = json.loads(run([*command, path]))
    return result


def check(path: Path, fmt: str) -> None:
    """Raises ToolError if qemu-img finds the image inconsistent."""
    run(["qemu-img", "check", "-f", fmt, path])
