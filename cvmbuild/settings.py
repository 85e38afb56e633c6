"""Where `cvmbuild publish` takes its settings from, so a build script's line stays short.

Command line first, then CVMBUILD_* environment variables, then the `[publish]` table
of the nearest cvmbuild.toml in the current directory or above (the build tree).
Paths and tags may contain `{version}` (docs/PUBLISHING.md, "Build scripts").
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from cvmbuild.errors import BuildError

CONFIG_NAME = "cvmbuild.toml"
ENVIRONMENT = {
    "repo": "CVMBUILD_REPO",
    "path": "CVMBUILD_PATH",
    "token_file": "CVMBUILD_TOKEN_FILE",
    "tag": "CVMBUILD_TAG",
    "message": "CVMBUILD_MESSAGE",
    "version": "CVMBUILD_VERSION",
}


@dataclass(frozen=True)
class PublishSettings:
    repo: str | None = None
    path: str | None = None
    token_file: str | None = None
    tag: str | None = None
    message: str | None = None
    version: str | None = None


def find_config(start: Path) -> Path | None:
    for directory in [start, *start.parents]:
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def _line_of(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith(key) and "=" in line:
            return number
    return 0


def load_config(path: Path) -> PublishSettings:
    """The [publish] table of a cvmbuild.toml; errors name the file, line and key."""
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise BuildError(f"{path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(f"{path}: not valid TOML ({exc})") from exc
    unknown_tables = set(data) - {"publish"}
    if unknown_tables:
        name = sorted(unknown_tables)[0]
        raise BuildError(f"{path}:{_line_of(text, '[' + name)}: unknown table [{name}]")
    table = data.get("publish", {})
    known = {f.name for f in fields(PublishSettings)}
    values: dict[str, str] = {}
    for key, value in table.items():
        where = f"{path}:{_line_of(text, key)}: publish.{key}"
        if key not in known:
            raise BuildError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
        if not isinstance(value, str):
            raise BuildError(f"{where}: expected a string, got {type(value).__name__}")
        values[key] = value
    # Files and directories it names are relative to the file that names them.
    if "token_file" in values:
        values["token_file"] = str(path.parent / os.path.expanduser(values["token_file"]))
    if "repo" in values and not values["repo"].startswith(("http://", "https://", "s3://")):
        values["repo"] = str(path.parent / os.path.expanduser(values["repo"]))
    return PublishSettings(**values)


def resolve(
    given: PublishSettings, environ: Mapping[str, str], cwd: Path, config: Path | None = None
) -> tuple[PublishSettings, Path | None]:
    """Merge the three sources and fill in {version}; returns the settings and the
    config file used, if any."""
    config = config or find_config(cwd)
    from_file = load_config(config) if config is not None else PublishSettings()
    merged: dict[str, str | None] = {}
    for f in fields(PublishSettings):
        merged[f.name] = (
            getattr(given, f.name) or environ.get(ENVIRONMENT[f.name]) or getattr(from_file, f.name)
        )
    version = merged["version"]
    for key in ("path", "tag", "message"):
        value = merged[key]
        if value is not None and "{version}" in value:
            if not version:
                source = f"{config}: publish.{key}" if getattr(from_file, key) else key
                raise BuildError(
                    f"{source} uses {{version}}: give --version or set CVMBUILD_VERSION"
                )
            merged[key] = value.replace("{version}", version)
    return PublishSettings(**merged), config
