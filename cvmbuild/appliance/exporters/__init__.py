"""One module per image format; each turns the built raw disk into files in DIR.

`export(fmt, context)` loads the format's module only when it is asked for (boto3 is
imported by `ami` alone).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from cvmbuild.appliance import FORMATS
from cvmbuild.appliance.recipe import Recipe


@dataclass(frozen=True)
class ExportContext:
    recipe: Recipe
    disk: Path  # the raw disk image the build made
    output: Path  # the directory the images go to
    epoch: int  # timestamps inside archives (OVA)
    content_hash: str  # of the rootfs: seeds identifiers that must be stable
    endpoint_url: str | None = None  # ami: an EC2/EBS endpoint (moto in the tests)
    region: str | None = None
    vboxwrappers: tuple[Path, ...] = ()  # boinc: the operator's vboxwrapper binaries

    @property
    def name(self) -> str:
        return self.recipe.appliance.name


def export(fmt: str, context: ExportContext) -> list[Path]:
    """Write the image(s) of one format; returns the paths written."""
    assert fmt in FORMATS, fmt
    module = importlib.import_module(f"cvmbuild.appliance.exporters.{fmt}")
    paths: list[Path] = module.export(context)
    return paths
