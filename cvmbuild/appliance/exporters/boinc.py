"""boinc: the appliance as a BOINC application, an app-version tree as a project's
`bin/update_versions` reads it (`apps/APP/VERSION/PLATFORM__PLANCLASS/`, version.xml
per directory), plus an `app_info.xml` that runs the QEMU variant unchanged under the
anonymous platform (no project server needed). BOINC files are immutable, so every file
but version.xml carries a content hash (sha256, 12 hex digits) in its name.

    NAME.boinc/
      app_info.xml              anonymous platform: copy it and the QEMU variant's files
                                (not its version.xml) into the client's projects/URL/
      apps/APP/VERSION/x86_64-pc-linux-gnu__PLAN/          (plan class: [boinc] plan_class)
        version.xml
        cvm_vmwrapper_<h>.pyz   the wrapper zipapp (cvmbuild.boinc), main program
        cvm_job_<h>.xml         logical name vm_job.xml: our VM wrapper's job file
        NAME_<h>.qcow2          logical name vm_image.qcow2, sticky: the read-only base
      apps/APP/VERSION/windows_x86_64__VBOXPLAN/ and x86_64-pc-linux-gnu__VBOXPLAN/
        version.xml             BOINC's standard vboxwrapper as main program
        vboxwrapper binary      from `--vboxwrapper PATH` (the operator's BOINC release);
                                without it version.xml names vboxwrapper_<platform>, to
                                be added before update_versions (which names it missing)
        cvm_vbox_job_<h>.xml    logical name vbox_job.xml
        cvm_userdata_<h>.toml   logical name user-data, copied to shared/ (copy_to_shared)
        NAME_<h>.vdi            sticky, gzip for download; a multiattach parent disk

Work units for the VirtualBox variant: vboxwrapper copies `copy_to_guest` inputs from
the slot into shared/ (so the input template gives them `<copy_file/>`), and the job
leaves its `copy_from_guest` outputs in shared/, so the result template names them
`shared/NAME` with `<copy_file/>`.

The second VirtualBox directory links to the first one's files (update_versions
follows links, as LHC@home's release script relies on). A macOS vboxwrapper given
with --vboxwrapper adds an x86_64-apple-darwin__VBOXPLAN directory.

The app_info.xml beside `apps/`, not in the QEMU directory: update_versions publishes
every file of a version directory, and one app_info.xml name with different contents
in two app versions would stop it ("BOINC files are immutable").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from cvmbuild.appliance.boot import user_data
from cvmbuild.appliance.errors import ApplianceError
from cvmbuild.appliance.exporters import ExportContext, qcow2, vdi
from cvmbuild.appliance.guest_agent import VBOX_HEARTBEAT, VBOX_PROGRESS, VBOX_SHUTDOWN
from cvmbuild.appliance.recipe import Recipe, boinc_version_num
from cvmbuild.boinc.zipapp import build_zipapp

LINUX = "x86_64-pc-linux-gnu"
WINDOWS = "windows_x86_64"
DARWIN = "x86_64-apple-darwin"
# The BOINC API the wrapper's ctypes binding follows (cvmbuild/boinc/api.py: 7.20's
# boinc_api.h). update_versions finds no version string in a zipapp, and the client
# treats an app version without one (< 6.0) as pre-mmap (SysV shared memory).
API_VERSION = "7.20.5"
JOB_FILE = "vm_job.xml"  # the logical names the wrappers resolve
IMAGE = "vm_image.qcow2"
VBOX_JOB_FILE = "vbox_job.xml"  # vboxwrapper's JOB_FILENAME
USER_DATA = "user-data"  # read by the guest agent from vboxwrapper's shared directory


@dataclass(frozen=True)
class AppFile:
    """One file of an app version and how the client gives it to the task."""

    name: str  # physical name
    logical: str = ""  # open_name: the task resolves it through a link in its slot
    main_program: bool = False
    copy_file: bool = False  # a copy in the slot instead of a link
    sticky: bool = False
    gzip: bool = False  # update_versions offers a .gz for download


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _flags(f: AppFile, *names: str) -> str:
    return "".join(f"    <{n}/>\n" for n in names if getattr(f, n))


def version_xml(files: list[AppFile], needs_network: bool, api_version: str = "") -> str:
    """update_versions' version.xml: per file physical and logical name, main_program,
    copy_file, gzip (and sticky, which update_versions does not read: kept for the
    operator's eyes, as LHC@home writes it). Without api_version, update_versions
    takes it from the main program's binary (vboxwrapper's)."""
    body = []
    for f in files:
        logical = f"    <logical_name>{escape(f.logical)}</logical_name>\n" if f.logical else ""
        body.append(
            f"  <file>\n    <physical_name>{escape(f.name)}</physical_name>\n{logical}"
            + _flags(f, "main_program", "copy_file", "sticky", "gzip")
            + "  </file>\n"
        )
    network = "  <needs_network/>\n" if needs_network else ""
    api = f"  <api_version>{api_version}</api_version>\n" if api_version else ""
    return "<version>\n" + "".join(body) + api + "  <dont_throttle/>\n" + network + "</version>\n"


def app_info_xml(
    app: str, version_num: int, plan_class: str, cpus: int, files: list[AppFile],
    needs_network: bool,
) -> str:  # fmt: skip
    """The anonymous platform's app_info.xml for one app version (client/cs_statefile.cpp
    parse_app_info: file_info without URLs, app_version with file_refs)."""
    infos = "".join(
        f"  <file_info>\n    <name>{escape(f.name)}</name>\n"
        + ("    <executable/>\n" if f.main_program else "")
        + ("    <sticky/>\n" if f.sticky else "")
        + "  </file_info>\n"
        for f in files
    )
    refs = "".join(
        f"    <file_ref>\n      <file_name>{escape(f.name)}</file_name>\n"
        + (f"      <open_name>{escape(f.logical)}</open_name>\n" if f.logical else "")
        + ("      <main_program/>\n" if f.main_program else "")
        + ("      <copy_file/>\n" if f.copy_file else "")
        + "    </file_ref>\n"
        for f in files
    )
    network = "    <needs_network/>\n" if needs_network else ""
    return (
        f"<app_info>\n  <app>\n    <name>{escape(app)}</name>\n"
        f"    <user_friendly_name>{escape(app)}</user_friendly_name>\n  </app>\n{infos}"
        f"  <app_version>\n    <app_name>{escape(app)}</app_name>\n"
        f"    <version_num>{version_num}</version_num>\n    <platform>{LINUX}</platform>\n"
        f"    <plan_class>{escape(plan_class)}</plan_class>\n"
        f"    <avg_ncpus>{cpus}</avg_ncpus>\n    <api_version>{API_VERSION}</api_version>\n"
        f"    <dont_throttle/>\n{network}{refs}  </app_version>\n</app_info>\n"
    )


def job_user_data(recipe: Recipe, with_job: bool) -> str:
    """The user data (TOML, as the guest agent reads it) the job files carry: the
    recipe's first repository with its public key inline, and, for vboxwrapper (whose
    job file has no command), the job."""
    repo = recipe.repository[0] if recipe.repository else None
    key_file = recipe.public_key_file(repo) if repo else None
    text = user_data(
        repo.url if repo else None,
        key_file.read_text() if key_file else None,
        repo.proxy if repo else None,
        recipe.job.command if with_job else None,
    )
    return text if text.strip() else ""


def _element(tag: str, value: str | int | bool) -> str:
    if isinstance(value, bool):  # BOINC's parse_bool: <tag/> is true
        return f"  <{tag}/>\n" if value else f"  <{tag}>0</{tag}>\n"
    return f"  <{tag}>{escape(str(value))}</{tag}>\n"


def vm_job_xml(recipe: Recipe) -> str:
    """Our VM wrapper's job file (cvmbuild/boinc/jobfile.py, docs/BOINC.md): every
    value spelt out, so the file says what the task does."""
    b, vm = recipe.boinc, recipe.vm
    values: list[tuple[str, str | int | bool]] = [
        ("image", IMAGE),
        ("memory_size_mb", vm.memory_mb),
        ("cpus", vm.cpus),
        ("job_duration", b.job_duration),
        ("minimum_heartbeat_interval", b.minimum_heartbeat_interval),
        ("minimum_checkpoint_interval", b.minimum_checkpoint_interval),
        ("enable_vm_savestate_usage", True),
        ("enable_network", b.enable_network),
        ("output_disk_mb", b.output_disk_mb),
        ("command_line", recipe.job.command),
        ("user_data", job_user_data(recipe, with_job=False)),
        ("user_data_file", USER_DATA),
    ]
    values += [("copy_to_guest", name) for name in b.copy_to_guest]
    values += [("copy_from_guest", name) for name in b.copy_from_guest]
    return "<vm_job>\n" + "".join(_element(t, v) for t, v in values) + "</vm_job>\n"


def vbox_job_xml(recipe: Recipe, vdi_name: str, with_user_data: bool) -> str:
    """vboxwrapper's vbox_job.xml (samples/vboxwrapper/vboxjob.cpp): the image as a
    multiattach parent in the project directory (each task a differencing disk), the
    shared directory with the guest contract's files, saved state on quit."""
    b, vm = recipe.boinc, recipe.vm
    values: list[tuple[str, str | int | bool]] = [
        ("os_name", "Debian_64"),
        ("memory_size_mb", vm.memory_mb),
        ("multiattach_vdi_file", vdi_name),
        ("enable_network", b.enable_network),
        ("enable_shared_directory", True),
        ("heartbeat_filename", VBOX_HEARTBEAT),
        ("minimum_heartbeat_interval", b.minimum_heartbeat_interval),
        ("fraction_done_filename", VBOX_PROGRESS),
        ("completion_trigger_file", VBOX_SHUTDOWN),
        ("minimum_checkpoint_interval", b.minimum_checkpoint_interval),
        ("enable_vm_savestate_usage", True),
    ]
    if b.job_duration:
        values.append(("job_duration", b.job_duration))
    if with_user_data:
        values.append(("copy_to_shared", USER_DATA))
    values += [("copy_to_shared", name) for name in b.copy_to_guest]
    return "<vbox_job>\n" + "".join(_element(t, v) for t, v in values) + "</vbox_job>\n"


def vbox_platform(path: Path) -> str:
    """The BOINC platform of a vboxwrapper binary, from its executable header."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise ApplianceError(f"--vboxwrapper {path}: cannot read it ({exc.strerror})") from exc
    if head[:4] == b"\x7fELF" and head[4] == 2 and head[18:20] == b"\x3e\x00":
        return LINUX
    if head[:4] == b"\xcf\xfa\xed\xfe" and head[4:8] == b"\x07\x00\x00\x01":
        return DARWIN
    if head[:2] == b"MZ" and len(head) >= 64:
        (pe,) = struct.unpack_from("<I", head, 0x3C)
        if head[pe : pe + 6] == b"PE\0\0\x64\x86":
            return WINDOWS
    raise ApplianceError(
        f"--vboxwrapper {path}: not an x86_64 Windows, Linux or macOS executable; "
        "give vboxwrapper binaries from a BOINC release"
    )


def vbox_platforms(wrappers: tuple[Path, ...]) -> dict[str, Path]:
    """Platform -> vboxwrapper binary; one binary per platform."""
    found: dict[str, Path] = {}
    for path in wrappers:
        platform = vbox_platform(path)
        if platform in found:
            raise ApplianceError(
                f"--vboxwrapper {path}: {found[platform]} is already the {platform} one"
            )
        found[platform] = path
    return found


def _stable_vdi_uuids(path: Path, seed: str) -> None:
    """qemu-img gives a VDI random image and snapshot UUIDs; derive them from the
    rootfs content hash instead, so the same build gives the same bytes (and name).
    VirtualBox registers a multiattach parent by its UUID: a different image gets a
    different one. Offsets: the VDI 1.1 header (QEMU's block/vdi.c VdiHeader)."""
    with open(path, "r+b") as f:
        f.seek(392)  # uuid_image, then uuid_last_snap
        for part in ("image", "last snapshot"):
            f.write(uuid.uuid5(uuid.NAMESPACE_URL, f"cvm-vdi:{seed}:{part}").bytes_le)


def _hashed(path: Path, stem: str, suffix: str) -> Path:
    """Rename path to STEM_<hash>SUFFIX beside it."""
    target = path.with_name(f"{stem}_{file_hash(path)}{suffix}")
    os.replace(path, target)
    return target


def _write_hashed(directory: Path, stem: str, suffix: str, text: str) -> Path:
    data = text.encode()
    target = directory / f"{stem}_{short_hash(data)}{suffix}"
    target.write_bytes(data)
    return target


def _qemu_variant(context: ExportContext, directory: Path) -> list[AppFile]:
    recipe = context.recipe
    image = qcow2.export(dataclasses.replace(context, output=directory))[0]
    image = _hashed(image, context.name, ".qcow2")
    wrapper = build_zipapp(directory / "cvm_vmwrapper.pyz")
    wrapper = _hashed(wrapper, "cvm_vmwrapper", ".pyz")
    wrapper.chmod(0o755)
    job = _write_hashed(directory, "cvm_job", ".xml", vm_job_xml(recipe))
    return [
        AppFile(wrapper.name, main_program=True),
        AppFile(job.name, JOB_FILE, copy_file=True),
        AppFile(image.name, IMAGE, sticky=True),
    ]


def _vbox_variant(context: ExportContext, directory: Path) -> list[AppFile]:
    image = vdi.export(dataclasses.replace(context, output=directory))[0]
    _stable_vdi_uuids(image, context.content_hash)
    image = _hashed(image, context.name, ".vdi")
    files = [AppFile(image.name, sticky=True, gzip=True)]
    data = job_user_data(context.recipe, with_job=True)
    if data:
        # copy_file: vboxwrapper copies the slot's file itself into shared/
        user = _write_hashed(directory, "cvm_userdata", ".toml", data)
        files.append(AppFile(user.name, USER_DATA, copy_file=True))
    job = _write_hashed(
        directory, "cvm_vbox_job", ".xml", vbox_job_xml(context.recipe, image.name, bool(data))
    )
    return [AppFile(job.name, VBOX_JOB_FILE, copy_file=True), *files]


def _wrapper_name(platform: str) -> str:
    return f"vboxwrapper_{platform}" + (".exe" if platform == WINDOWS else "")


def export(context: ExportContext) -> list[Path]:
    recipe = context.recipe
    app = recipe.boinc.app_name or context.name
    version_num = boinc_version_num(recipe.boinc.version)
    network = recipe.boinc.enable_network
    bundle = context.output / f"{context.name}.boinc"
    shutil.rmtree(bundle, ignore_errors=True)
    versions = bundle / "apps" / app / recipe.boinc.version

    qemu_dir = versions / f"{LINUX}__{recipe.boinc.plan_class}"
    qemu_dir.mkdir(parents=True)
    qemu_files = _qemu_variant(context, qemu_dir)
    (qemu_dir / "version.xml").write_text(version_xml(qemu_files, network, API_VERSION))
    (bundle / "app_info.xml").write_text(
        app_info_xml(app, version_num, recipe.boinc.plan_class, recipe.vm.cpus, qemu_files, network)
    )

    wrappers = vbox_platforms(context.vboxwrappers)
    platforms = [WINDOWS, LINUX] + ([DARWIN] if DARWIN in wrappers else [])
    vbox_dirs = [versions / f"{p}__{recipe.boinc.vbox_plan_class}" for p in platforms]
    vbox_dirs[0].mkdir()
    files = _vbox_variant(context, vbox_dirs[0])
    for platform, directory in zip(platforms, vbox_dirs, strict=True):
        if directory != vbox_dirs[0]:
            directory.mkdir()
            for f in files:
                (directory / f.name).symlink_to(Path("..") / vbox_dirs[0].name / f.name)
        main = _wrapper_name(platform)
        if platform in wrappers:
            main = wrappers[platform].name
            shutil.copyfile(wrappers[platform], directory / main)
            (directory / main).chmod(0o755)
        listed = [AppFile(main, main_program=True, copy_file=True), *files]
        (directory / "version.xml").write_text(version_xml(listed, network))
    return [bundle]
