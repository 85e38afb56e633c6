"""`cvmbuild export`: build the recipe's disk once, then write one image per format."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cvmbuild.appliance.build import BUILD_STAGES, Stages, build_disk
from cvmbuild.appliance.errors import ApplianceError
from cvmbuild.appliance.exporters import ExportContext, export
from cvmbuild.appliance.exporters.boinc import vbox_platforms
from cvmbuild.appliance.process import require
from cvmbuild.appliance.recipe import Recipe, load_recipe, parse_formats
from cvmfs_client.console import human

# Formats whose size is a full disk by design (sparse on disk) or not a file here.
UNCOMPRESSED = {"raw", "vhd", "ami"}
# Bundles of several images, each of which must fit the budget on its own.
IMAGE_BUNDLES = {"boinc": (".qcow2", ".vdi")}


@dataclass(frozen=True)
class ExportRequest:
    recipe: Path
    output: Path
    formats: str | None = None  # "qcow2,vdi"; None: the recipe's [appliance] formats
    endpoint_url: str | None = None
    region: str | None = None
    keep_work: bool = False
    vboxwrappers: tuple[Path, ...] = ()  # boinc: vboxwrapper binaries to ship


@dataclass
class ExportResult:
    images: dict[str, list[Path]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes on disk per format
    stage_seconds: dict[str, float] = field(default_factory=dict)
    content_hash: str = ""


def disk_usage(path: Path) -> int:
    """Bytes a file or bundle directory occupies (sparse blocks not counted, a symbolic
    link to a file counted where the file is)."""
    if path.is_symlink():
        return 0
    if path.is_dir():
        return sum(disk_usage(p) for p in path.iterdir())
    return path.stat().st_blocks * 512


def mounts_below(directory: Path) -> list[str]:
    """Mount points inside directory: a chroot mmdebstrap failed to clean up must never
    be deleted recursively (it could reach the host's /dev or /proc)."""
    prefix = os.path.realpath(directory) + "/"
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        return []
    return [p for p in points if p.startswith(prefix)]


def export_appliance(request: ExportRequest) -> ExportResult:
    recipe = load_recipe(request.recipe)
    formats = parse_formats(request.formats or ",".join(recipe.appliance.formats))
    if request.vboxwrappers:
        if "boinc" not in formats:
            raise ApplianceError("--vboxwrapper goes with --format boinc")
        vbox_platforms(request.vboxwrappers)  # a wrong binary fails before the build
    if os.geteuid() != 0:
        raise ApplianceError(
            "building an appliance needs root (mmdebstrap --mode=root, chroot): run it with sudo"
        )
    if set(formats) - {"ami"}:
        require("qemu-img")
    request.output.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".cvmbuild-work-", dir=request.output))
    stages = Stages(BUILD_STAGES + len(formats))
    try:
        built = build_disk(recipe, workdir, stages)
        (request.output / f"{recipe.appliance.name}.build.json").write_text(built.record + "\n")
        context = ExportContext(
            recipe=recipe,
            disk=built.raw,
            output=request.output,
            epoch=recipe.base.source_date_epoch,
            content_hash=built.content_hash,
            endpoint_url=request.endpoint_url,
            region=request.region,
            vboxwrappers=request.vboxwrappers,
        )
        result = ExportResult(content_hash=built.content_hash)
        for fmt in formats:
            with stages.stage(f"export {fmt}") as note:
                paths = export(fmt, context)
                result.images[fmt] = paths
                result.sizes[fmt] = sum(disk_usage(p) for p in paths)
                note["detail"] = ", ".join(f"{p.name} {human(disk_usage(p))}" for p in paths)
        result.stage_seconds = dict(stages.times)
    finally:
        mounted = mounts_below(workdir)
        if request.keep_work or mounted:
            why = f" (still mounted there: {', '.join(mounted)})" if mounted else ""
            print(f"work directory kept: {workdir}{why}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _check_budget(recipe, result)
    return result


def _check_budget(recipe: Recipe, result: ExportResult) -> None:
    budget = recipe.appliance.size_budget_mb * 1024 * 1024
    over = []
    for fmt, size in result.sizes.items():
        if fmt in UNCOMPRESSED:
            continue
        if fmt in IMAGE_BUNDLES:
            images = [
                image
                for bundle in result.images.get(fmt, [])
                for image in sorted(bundle.rglob("*"))
                if image.suffix in IMAGE_BUNDLES[fmt] and not image.is_symlink()
            ]
            over += [f"{fmt} {i.name} {human(s)}" for i in images if (s := disk_usage(i)) > budget]
        elif size > budget:
            over.append(f"{fmt} {human(size)}")
    if over:
        raise ApplianceError(
            f"{recipe.path}: images over the size budget of {recipe.appliance.size_budget_mb} MB: "
            f"{', '.join(over)}; trim more ([base] remove) or raise [appliance] size_budget_mb"
        )
