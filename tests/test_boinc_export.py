"""`cvmbuild export --format boinc`: the app-version tree a BOINC project's
update_versions reads, and the app_info.xml that runs it under the anonymous platform.

Structural: made from a small raw disk (the exporter converts whatever disk the build
made), so no appliance build is needed; the real BOINC client reads the app_info.xml.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmbuild.appliance.errors import ApplianceError, RecipeError
from cvmbuild.appliance.export import ExportResult, _check_budget
from cvmbuild.appliance.exporters import ExportContext, export, qemu_img
from cvmbuild.appliance.guest_agent import parse_user_data
from cvmbuild.appliance.recipe import load_recipe, parse_recipe
from cvmbuild.boinc import jobfile
from tests.boinc_project import exported_app, scheduler_emulator
from tests.boinc_running import running_client
from tests.conftest import run_cli

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent

# Every tag vboxwrapper's VBOX_JOB::parse() reads (samples/vboxwrapper/vboxjob.cpp,
# BOINC/boinc commit c5c6cb79b9aa4747d80d066e3627c22f2c124144, file last changed in
# 2f76f0c1b8db3ff06cc08fab50f2e7dd695d7d28); any other tag is logged as unexpected and
# ignored, so a misspelt tag would silently change nothing on a volunteer's host.
VBOXJOB_BOOL_TAGS = {
    "enable_cern_dataformat", "enable_network", "network_bridged_mode",
    "enable_nat_dns_host_resolver", "enable_shared_directory", "enable_scratch_directory",
    "share_slot_dir", "share_project_dir", "enable_floppyio", "enable_cache_disk",
    "enable_isocontextualization", "enable_remotedesktop", "enable_screenshots_on_error",
    "enable_graphics_support", "enable_vm_savestate_usage", "disable_automatic_checkpoints",
    "boot_iso", "copy_cmdline_to_shared",
}  # fmt: skip
VBOXJOB_VALUE_TAGS = {
    "vm_disk_controller_type", "vm_disk_controller_model", "os_name", "vram_size_mb",
    "memory_size_mb", "job_duration", "minimum_checkpoint_interval",
    "minimum_heartbeat_interval", "fraction_done_filename", "heartbeat_filename",
    "completion_trigger_file", "temporary_exit_trigger_file", "multiattach_vdi_file",
    "vm_network_driver", "pf_guest_port", "pf_host_port", "copy_to_shared",
    "trickle_trigger_file", "intermediate_upload_file", "port_forward",
}  # fmt: skip

PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
RECIPE = """\
[appliance]
name = "cvm-test"

[[repository]]
name = "sw.example.org"
url = "http://10.0.2.2:8000"
public_key = "sw.pub"

[job]
command = "python3 /cvmfs/sw.example.org/sw/hello/1.0/bin/hello.py > result.txt"

[vm]
memory_mb = 768
cpus = 2

[boinc]
app_name = "cvm-hello"
version = "1.02"
job_duration = 3600
copy_to_guest = ["input.dat"]
copy_from_guest = ["result.txt"]
"""


def fake_windows_exe(path: Path) -> Path:
    """The smallest header vbox_platform() reads as an x86_64 PE (what BOINC's
    vboxwrapper_NNNNN_windows_x86_64.exe starts with)."""
    head = bytearray(b"MZ" + bytes(62))
    struct.pack_into("<I", head, 0x3C, 0x40)
    path.write_bytes(bytes(head) + b"PE\0\0\x64\x86" + bytes(32))
    return path


def raw_disk(path: Path, marker: bytes) -> Path:
    """A sparse 8 MiB raw disk with a few bytes written at 1 MiB."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "8M"], check=True)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(marker)
    return path


@dataclass
class Bundle:
    root: Path
    qemu: Path  # the QEMU variant's directory
    vbox: dict[str, Path]  # platform -> VirtualBox variant directory
    disk: Path


def export_bundle(work: Path, marker: bytes = b"appliance v1", wrappers: bool = True) -> Bundle:
    work.mkdir(parents=True, exist_ok=True)
    (work / "sw.pub").write_text(PEM)
    recipe = parse_recipe(RECIPE, work / "r.toml")
    disk = raw_disk(work / "disk.raw", marker)
    vboxwrappers = (fake_windows_exe(work / "vboxwrapper_26206_windows_x86_64.exe"),
                    Path(shutil.which("true") or "/bin/true")) if wrappers else ()  # fmt: skip
    context = ExportContext(
        recipe=recipe, disk=disk, output=work / "out", epoch=0,
        content_hash="c0ffee" * 10 + "0000", vboxwrappers=vboxwrappers,
    )  # fmt: skip
    (root,) = export("boinc", context)
    versions = root / "apps" / "cvm-hello" / "1.02"
    return Bundle(
        root,
        versions / "x86_64-pc-linux-gnu__qemu",
        {p: versions / f"{p}__vbox64" for p in ("windows_x86_64", "x86_64-pc-linux-gnu")},
        disk,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return export_bundle(tmp_path_factory.mktemp("boinc-export"))


def version_files(directory: Path) -> dict[str, ET.Element]:
    root = ET.parse(directory / "version.xml").getroot()
    assert root.tag == "version"
    return {(f.findtext("physical_name") or ""): f for f in root.iter("file")}


def logical(files: dict[str, ET.Element], name: str) -> str:
    (physical,) = [p for p, f in files.items() if f.findtext("logical_name") == name]
    return physical


# -- the tree -------------------------------------------------------------------------


def test_the_tree_has_a_qemu_and_two_virtualbox_app_versions(bundle: Bundle) -> None:
    versions = bundle.qemu.parent
    assert sorted(p.name for p in versions.iterdir()) == [
        "windows_x86_64__vbox64", "x86_64-pc-linux-gnu__qemu", "x86_64-pc-linux-gnu__vbox64",
    ]  # fmt: skip
    assert (bundle.root / "app_info.xml").is_file()
    # update_versions publishes every file of a version directory: nothing stray there
    for directory in versions.iterdir():
        assert set(version_files(directory)) == {
            p.name for p in directory.iterdir() if p.name != "version.xml"
        }


def test_the_qemu_version_runs_the_wrapper_on_its_job_file_and_sticky_image(
    bundle: Bundle,
) -> None:
    files = version_files(bundle.qemu)
    (main,) = [p for p, f in files.items() if f.find("main_program") is not None]
    assert main.startswith("cvm_vmwrapper_") and main.endswith(".pyz")
    assert (bundle.qemu / main).stat().st_mode & 0o111
    assert (bundle.qemu / main).read_bytes().startswith(b"#!/usr/bin/env python3\n")
    image = logical(files, "vm_image.qcow2")
    assert files[image].find("sticky") is not None
    job = logical(files, "vm_job.xml")
    assert files[job].find("copy_file") is not None
    version = ET.parse(bundle.qemu / "version.xml").getroot()
    assert version.findtext("api_version") == "7.20.5"  # mmap shared memory (>= 6.0)
    assert version.find("dont_throttle") is not None  # no SIGSTOP throttling of a VM
    assert version.find("needs_network") is not None
    assert version.find("is_wrapper") is None  # QEMU, its child, must run niced


def test_the_job_file_carries_the_recipe_s_vm_job_and_repository(bundle: Bundle) -> None:
    job = ET.parse(bundle.qemu / logical(version_files(bundle.qemu), "vm_job.xml")).getroot()
    assert job.tag == "vm_job"
    assert job.findtext("image") == "vm_image.qcow2"
    assert job.findtext("memory_size_mb") == "768" and job.findtext("cpus") == "2"
    assert job.findtext("job_duration") == "3600"
    assert job.find("enable_vm_savestate_usage") is not None
    assert [e.text for e in job.iter("copy_to_guest")] == ["input.dat"]
    assert [e.text for e in job.iter("copy_from_guest")] == ["result.txt"]
    assert job.findtext("command_line") == (
        "python3 /cvmfs/sw.example.org/sw/hello/1.0/bin/hello.py > result.txt"
    )
    # the user data is what the appliance's agent reads, the public key inline
    user = parse_user_data(job.findtext("user_data") or "", "vm_job.xml")
    assert user == {
        "repository": {"url": "http://10.0.2.2:8000", "public_key": PEM, "proxy": "DIRECT"}
    }


def test_the_wrapper_reads_the_job_file_as_the_recipe_says(bundle: Bundle) -> None:
    path = bundle.qemu / logical(version_files(bundle.qemu), "vm_job.xml")
    job = jobfile.parse(path.read_bytes(), str(path))
    assert job == jobfile.VmJob(
        image="vm_image.qcow2", memory_size_mb=768, cpus=2, job_duration=3600,
        minimum_heartbeat_interval=600, minimum_checkpoint_interval=600,
        enable_vm_savestate_usage=True, enable_network=True,
        command_line="python3 /cvmfs/sw.example.org/sw/hello/1.0/bin/hello.py > result.txt",
        user_data=ET.parse(path).getroot().findtext("user_data", "").strip(),
        user_data_file="user-data",
        copy_to_guest=("input.dat",), copy_from_guest=("result.txt",), output_disk_mb=1024,
    )  # fmt: skip


def test_app_info_runs_the_qemu_version_under_the_anonymous_platform(bundle: Bundle) -> None:
    info = ET.parse(bundle.root / "app_info.xml").getroot()
    assert [a.findtext("name") for a in info.iter("app")] == ["cvm-hello"]
    names = {f.findtext("name") for f in info.iter("file_info")}
    assert names == set(version_files(bundle.qemu))
    (version,) = info.iter("app_version")
    assert version.findtext("version_num") == "102"
    assert version.findtext("platform") == "x86_64-pc-linux-gnu"
    assert version.findtext("plan_class") == "qemu"
    assert version.findtext("avg_ncpus") == "2"
    refs = {r.findtext("open_name") or "": r for r in version.iter("file_ref")}
    assert refs[""].find("main_program") is not None
    assert {"vm_job.xml", "vm_image.qcow2"} <= set(refs)


def test_vbox_job_uses_only_tags_vboxwrapper_parses(bundle: Bundle) -> None:
    directory = bundle.vbox["windows_x86_64"]
    files = version_files(directory)
    job = ET.parse(directory / logical(files, "vbox_job.xml")).getroot()
    assert job.tag == "vbox_job"
    for element in job:
        assert element.tag in VBOXJOB_BOOL_TAGS | VBOXJOB_VALUE_TAGS, element.tag
        if element.tag in VBOXJOB_BOOL_TAGS:  # parse_bool: <tag/> or a number
            assert (element.text or "") in ("", "0", "1"), element.tag
        else:
            assert element.text and element.text.strip(), element.tag
    values = {e.tag: e.text for e in job}
    assert values["memory_size_mb"] == "768" and values["job_duration"] == "3600"
    # the guest agent's side of vboxwrapper's contract (guest_agent.py)
    assert (values["heartbeat_filename"], values["fraction_done_filename"]) == (
        "heartbeat", "progress",
    )  # fmt: skip
    assert values["completion_trigger_file"] == "shutdown"
    assert job.find("enable_shared_directory") is not None
    assert job.find("enable_vm_savestate_usage") is not None
    # the image: a multiattach parent in the project directory, by its physical name
    vdi = values["multiattach_vdi_file"] or ""
    assert vdi in files and files[vdi].find("sticky") is not None
    assert [e.text for e in job.iter("copy_to_shared")] == ["user-data", "input.dat"]
    user = parse_user_data((directory / logical(files, "user-data")).read_text(), "user-data")
    assert user["job"]["command"].endswith("hello.py > result.txt")
    assert user["repository"]["public_key"] == PEM


def test_each_platform_runs_its_own_vboxwrapper_on_the_shared_files(bundle: Bundle) -> None:
    windows, linux = bundle.vbox["windows_x86_64"], bundle.vbox["x86_64-pc-linux-gnu"]
    mains = {}
    for directory in (windows, linux):
        files = version_files(directory)
        (main,) = [p for p, f in files.items() if f.find("main_program") is not None]
        assert (directory / main).is_file() and (directory / main).stat().st_mode & 0o111
        mains[directory] = main
    assert mains[windows] == "vboxwrapper_26206_windows_x86_64.exe"
    assert mains[linux] == "true"
    shared = set(version_files(windows)) - {mains[windows]}
    assert shared == set(version_files(linux)) - {mains[linux]}
    for name in shared:  # one copy on disk; update_versions follows the link
        assert (linux / name).is_symlink() and (linux / name).read_bytes() == (
            windows / name
        ).read_bytes()


def test_the_qcow2_and_vdi_hold_the_same_disk_as_the_build(bundle: Bundle) -> None:
    qcow2 = bundle.qemu / logical(version_files(bundle.qemu), "vm_image.qcow2")
    vdi = next(bundle.vbox["windows_x86_64"].glob("*.vdi"))
    raw_size = qemu_img.info(bundle.disk, "raw")["virtual-size"]
    for image, fmt in ((qcow2, "qcow2"), (vdi, "vdi")):
        info = qemu_img.info(image)
        assert info["format"] == fmt and info["virtual-size"] == raw_size
        qemu_img.check(image, fmt)
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(bundle.disk), str(image)],
            capture_output=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr


def test_file_names_follow_the_content(bundle: Bundle, tmp_path: Path) -> None:
    def names(b: Bundle) -> set[str]:
        return {p.name for d in (b.qemu, *b.vbox.values()) for p in d.iterdir()}

    again = export_bundle(tmp_path / "same")
    assert names(again) == names(bundle)  # same disk, same bytes, same names (vdi too)
    changed = export_bundle(tmp_path / "changed", marker=b"appliance v2")
    gone = names(bundle) - names(changed)
    assert {Path(n).suffix for n in gone} == {".qcow2", ".vdi", ".xml"}  # images, vbox job
    assert not {n for n in gone if n.startswith(("cvm_vmwrapper_", "cvm_job_"))}


def test_without_vboxwrapper_the_version_names_the_binary_to_add(tmp_path: Path) -> None:
    bundle = export_bundle(tmp_path, wrappers=False)
    for platform, directory in bundle.vbox.items():
        files = version_files(directory)
        missing = [p for p in files if not (directory / p).exists()]
        suffix = ".exe" if platform.startswith("windows") else ""
        assert missing == [f"vboxwrapper_{platform}{suffix}"]


# -- the recipe and the command line --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[boinc]\n\nversion = '1.0'\n", "r.toml:3: version: write it as MAJOR.MINOR with two"),
        ("[boinc]\nplan_clas = 'qemu'\n", "r.toml:2: unknown key 'plan_clas'"),
        ("[boinc]\nplan_class = 'qemu__mt'\n", "r.toml:2: plan_class: use letters"),
        ("[boinc]\njob_duration = -5\n", "r.toml:2: job_duration: must be 0"),
        ("[boinc]\nminimum_heartbeat_interval = 0\n", "r.toml:2: minimum_heartbeat_interval"),
        ("[boinc]\ncopy_from_guest = ['out/x']\n", "r.toml:2: copy_from_guest: 'out/x' is not"),
        ("[boinc]\nenable_network = 'yes'\n", "r.toml:2: enable_network must be boolean"),
    ],
)
def test_a_bad_boinc_table_names_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(text, Path("r.toml"))


def test_the_default_recipe_exports_version_1_00_with_plan_class_qemu() -> None:
    recipe = load_recipe(ROOT / "recipes" / "thin.toml")
    assert (recipe.boinc.version, recipe.boinc.plan_class) == ("1.00", "qemu")


def test_a_wrong_vboxwrapper_is_refused_before_building(tmp_path: Path) -> None:
    not_a_binary = tmp_path / "vboxwrapper"
    not_a_binary.write_text("#!/bin/sh\n")
    result = run_cli(
        "cvmbuild", "export", "--recipe", ROOT / "recipes" / "thin.toml", "--format", "boinc",
        "--vboxwrapper", not_a_binary, "--output", tmp_path / "out", check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert b"not an x86_64 Windows, Linux or macOS executable" in result.stderr
    assert not (tmp_path / "out").exists()


def test_each_image_of_the_bundle_must_fit_the_budget(bundle: Bundle) -> None:
    recipe = parse_recipe("[appliance]\nsize_budget_mb = 2\n", Path("r.toml"))
    fits = ExportResult(images={"boinc": [bundle.root]}, sizes={"boinc": 5 * MiB})
    _check_budget(recipe, fits)  # the sum may exceed it: a qcow2 and a vdi
    tight = parse_recipe("[appliance]\nsize_budget_mb = 0\n", Path("r.toml"))
    with pytest.raises(ApplianceError, match=r"boinc cvm-test_[0-9a-f]{12}\.qcow2"):
        _check_budget(tight, fits)


# -- the real BOINC client ------------------------------------------------------------


def test_the_real_client_takes_the_exported_app_under_the_anonymous_platform(
    bundle: Bundle, tmp_path: Path
) -> None:
    files, app_info = exported_app(bundle.root)
    assert {p.parent for p in files} == {bundle.qemu}
    with scheduler_emulator([]) as project:
        with running_client(tmp_path / "client", project.master_url, files, app_info) as client:
            client.wait_exit(timeout=180)  # asked for work, got none, idle: exits
    log = client.log.read_text()
    assert "Found app_info.xml; using anonymous platform" in log
    assert "app_info.xml" not in log.replace("Found app_info.xml; using anonymous", "")
    state = ET.parse(client.dir / "client_state.xml").getroot()
    (version,) = state.iter("app_version")
    assert version.findtext("app_name") == "cvm-hello"
    assert version.findtext("version_num") == "102"
    assert version.findtext("plan_class") == "qemu"
    assert version.findtext("api_version") == "7.20.5"
    # the client links an app version only if every file it names is there
    refs = {r.findtext("file_name"): r.findtext("open_name") for r in version.iter("file_ref")}
    files_by_logical = {v: k for k, v in refs.items()}
    assert set(refs) == {p.name for p in files}
    assert {None, "vm_job.xml", "vm_image.qcow2"} == set(files_by_logical)
    assert version.find("dont_throttle") is not None and version.find("needs_network") is not None
