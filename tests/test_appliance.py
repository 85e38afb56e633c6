"""The thin appliance: a recipe becomes images in every format, each converts back to
the same disk, and the appliance boots under QEMU, mounts a repository served on the
host and runs a program published there.

The build (mmdebstrap, as root) happens once per session; the fast tests above it
check the pure parts: recipes, partition table, initramfs, user data, console markers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cvmbuild.appliance import boot, boot_disks, cpio, disk, guest_agent, kmod, rootfs, seeds
from cvmbuild.appliance.build import BUILD_STAGES
from cvmbuild.appliance.errors import ApplianceError, RecipeError
from cvmbuild.appliance.export import ExportResult, _check_budget
from cvmbuild.appliance.exporters import ami, hdd, ova
from cvmbuild.appliance.recipe import load_recipe, parse_formats, parse_recipe
from tests.appliance_fixtures import ALL_FORMATS, AWS_ENV, THIN, Built, Served
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"


# -- recipes ----------------------------------------------------------------------------


def test_the_default_recipe_loads_as_typed_settings() -> None:
    recipe = load_recipe(THIN)
    assert recipe.appliance.name == "cvm-thin"
    assert recipe.repository[0].url.startswith("http://10.0.2.2")
    assert "virtio_blk" in recipe.kernel.modules and "ena" in recipe.kernel.modules
    assert any("-security" in source for source in recipe.apt_sources())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[appliance]\nname = 'x'\ncolour = 'red'\n", "r.toml:3: unknown key 'colour'"),
        ("[vm]\n\nmemory_mb = '512'\n", "r.toml:3: memory_mb must be integer"),
        ("[appliance]\nformats = ['qcow2', 'iso']\n", "r.toml:2: formats: unknown format 'iso'"),
        ("[[repository]]\nname = 'a'\nurl = 'ftp://x'\n", "r.toml:3: url: must be http"),
        ("[[repository]]\nname = 'a'\n", "r.toml:1: missing key 'url'"),
        ("[kernal]\npackage = 'x'\n", "r.toml:1: unknown table [kernal]"),
        ("[base\n", "r.toml: not valid TOML"),
    ],
)
def test_a_bad_recipe_names_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(text, Path("r.toml"))


def test_the_second_repository_table_is_located_by_its_own_line() -> None:
    text = "[[repository]]\nname = 'a'\nurl = 'http://a'\n\n[[repository]]\nname = 'b'\nurl = 3\n"
    with pytest.raises(RecipeError, match=r"r.toml:7: url must be string"):
        parse_recipe(text, Path("r.toml"))


def test_images_over_the_size_budget_fail_the_export() -> None:
    recipe = parse_recipe("[appliance]\nsize_budget_mb = 40\n", Path("r.toml"))
    ok = ExportResult(sizes={"qcow2": 39 * MiB, "raw": 500 * MiB, "vhd": 500 * MiB})
    _check_budget(recipe, ok)  # raw and vhd are full-size by design
    with pytest.raises(ApplianceError, match=r"over the size budget of 40 MB: ova 41.0 MiB"):
        _check_budget(recipe, ExportResult(sizes={"ova": 41 * MiB}))


def test_bad_format_names_on_the_command_line_are_refused() -> None:
    assert parse_formats("qcow2, vdi,qcow2") == ["qcow2", "vdi"]
    with pytest.raises(RecipeError, match="unknown format iso"):
        parse_formats("qcow2,iso")


def test_export_refuses_a_bad_format_before_building(tmp_path: Path) -> None:
    result = run_cli(
        "cvmbuild", "export", "--recipe", THIN, "--format", "qcow2,floppy",
        "--output", tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert b"error: --format 'qcow2,floppy': unknown format floppy" in result.stderr
    assert not any(tmp_path.iterdir())


# -- pure parts of the image ------------------------------------------------------------


def test_the_client_the_image_carries_needs_only_what_the_image_installs() -> None:
    """cvmfs_client and cvmfs_format are copied into the image with Debian's python3-cryptography,
    -zstandard, -pycurl and libfuse3-3 (rootfs.CLIENT_PACKAGES, loaded with ctypes): a new
    third-party import there needs a package in the image too, unless the code does
    without it (imported in a `try` that catches ImportError, as progress.py's tqdm)."""
    import ast
    import sys

    allowed = {"cryptography", "zstandard", "pycurl", "cvmfs_client", "cvmfs_format"}
    sources = [*(ROOT / "cvmfs_client").glob("*.py"), *(ROOT / "cvmfs_format").glob("*.py")]
    for source in sorted(sources):
        tree = ast.parse(source.read_text())
        optional = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try)
            and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
            )
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in allowed, (source.name, name)
    assert {"python3-cryptography", "python3-zstandard", "python3-pycurl"} <= set(
        rootfs.CLIENT_PACKAGES
    )


def test_partition_table_is_mib_aligned_and_marks_the_boot_partition() -> None:
    partitions, size = disk.layout(
        [(3 * MiB + 1, disk.TYPE_FAT16_LBA, True), (10 * MiB, disk.TYPE_LINUX, False)]
    )
    assert [(p.start, p.size) for p in partitions] == [(MiB, 4 * MiB), (5 * MiB, 10 * MiB)]
    assert size == 15 * MiB
    mbr = disk.master_boot_record(b"\xeb\x63", 0x12345678, partitions)
    assert len(mbr) == 512 and mbr[510:] == b"\x55\xaa" and mbr[:2] == b"\xeb\x63"
    assert struct.unpack_from("<I", mbr, 440)[0] == 0x12345678
    status, ptype, lba, sectors = struct.unpack_from("<B3xB3xII", mbr, 446)
    assert (status, ptype, lba, sectors) == (0x80, 0x0E, 2048, 8192)
    status, ptype, lba, sectors = struct.unpack_from("<B3xB3xII", mbr, 462)
    assert (status, ptype, lba, sectors) == (0, 0x83, 10240, 20480)


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        header = data[offset : offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = offset + 110 + namesize
        name = data[offset + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[start : start + size])
        offset = start + size + (-(start + size) % 4)


def test_initramfs_archive_is_deterministic_newc() -> None:
    entries = [cpio.file("init", b"#!/bin/sh\n", 0o755), cpio.directory("bin")]
    entries.append(cpio.char_device("dev/console", 5, 1))
    first = cpio.archive(entries, mtime=1704067200)
    assert first == cpio.archive(list(reversed(entries)), mtime=1704067200)
    parsed = _read_newc(first)
    assert list(parsed) == ["bin", "dev/console", "init"]
    assert parsed["init"] == (0o100755, b"#!/bin/sh\n")


def test_kernel_module_names_treat_dash_and_underscore_alike() -> None:
    assert kmod.normalize("kernel/drivers/block/xen-blkfront.ko") == "xen_blkfront"
    assert kmod.normalize("nls_cp437.ko.xz") == "nls_cp437"


def _module_elf(info: dict[str, str]) -> bytes:
    """A minimal ELF64 object with a .modinfo section, as modpost writes one."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    names = b"\0.shstrtab\0.modinfo\0"
    body_offset = 64
    names_offset = body_offset + len(modinfo)
    shoff = names_offset + len(names)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    sections = bytes(64)  # the null section
    sections += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 11, 1, 0, 0, body_offset, len(modinfo), 0, 0, 1, 0)
    return header + modinfo + names + sections


def test_modules_load_after_their_dependencies_and_missing_ones_are_named(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "6.1.0-test"
    modules = {
        "kernel/drivers/ata/ahci.ko": {"name": "ahci", "depends": "libahci,libata"},
        "kernel/drivers/ata/libahci.ko": {"name": "libahci", "depends": "libata"},
        "kernel/drivers/ata/libata.ko": {"name": "libata", "depends": "scsi_mod"},
        "kernel/fs/fat/vfat.ko": {"name": "vfat", "depends": "fat", "softdep": "pre: nls_cp437"},
        "kernel/fs/fat/fat.ko": {"name": "fat", "depends": ""},
        "kernel/fs/nls/nls_cp437.ko": {"name": "nls_cp437", "depends": ""},
    }
    for rel, info in modules.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(_module_elf(info))
    (tree / "modules.builtin").write_text("kernel/drivers/scsi/scsi_mod.ko\n")
    assert kmod.modinfo((tree / "kernel/fs/fat/vfat.ko").read_bytes())["depends"] == ["fat"]
    selection = kmod.ModuleTree(tree).select(["ahci", "vfat", "scsi-mod"], "test-kernel")
    assert [Path(p).stem for p in selection.load_order] == [
        "libata", "libahci", "ahci", "fat", "nls_cp437", "vfat",
    ]  # fmt: skip
    assert selection.builtin == ["scsi_mod"]
    with pytest.raises(ApplianceError, match="test-kernel has neither .* for e1000, ena"):
        kmod.ModuleTree(tree).select(["ahci", "e1000", "ena"], "test-kernel")


def test_rootfs_content_hash_ignores_walk_order_but_not_content() -> None:
    a = rootfs.TreeEntry("etc/a", 0o100644, 0, 0, 1, "aa", 0)
    b = rootfs.TreeEntry("etc/b", 0o100644, 0, 0, 1, "bb", 0)
    assert rootfs.content_hash([a, b]) == rootfs.content_hash([b, a])
    changed = rootfs.TreeEntry("etc/b", 0o100600, 0, 0, 1, "bb", 0)
    assert rootfs.content_hash([a, b]) != rootfs.content_hash([a, changed])


def test_user_data_from_boot_reaches_the_guest_settings() -> None:
    key = "-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n"
    text = boot.user_data("http://10.0.2.2:8000", key, "DIRECT", 'echo "hi"; exit 0')
    overrides = guest_agent.parse_user_data(text, "config drive")
    base = guest_agent.Settings(
        repositories=[guest_agent.RepoSettings("sw", "http://old", "/cvmfs/sw")], job="true"
    )
    settings = guest_agent.apply_overrides(base, overrides)
    assert settings.repositories[0].url == "http://10.0.2.2:8000"
    assert settings.repositories[0].public_key == key
    assert settings.job == 'echo "hi"; exit 0'
    job64 = base64.urlsafe_b64encode(b"ls /cvmfs").decode().rstrip("=")
    cmdline = guest_agent.parse_cmdline(f"quiet cvm.repo_url=http://x:1 cvm.job64={job64}")
    settings = guest_agent.apply_overrides(settings, cmdline)
    assert (settings.repositories[0].url, settings.job) == ("http://x:1", "ls /cvmfs")


def test_user_data_comes_from_ec2_instance_metadata_with_a_token() -> None:
    import http.server
    import threading

    seen: list[tuple[str, str, str | None]] = []

    class Imds(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            seen.append(("PUT", self.path, self.headers["X-aws-ec2-metadata-token-ttl-seconds"]))
            self._reply(200, b"token-1")

        def do_GET(self) -> None:
            seen.append(("GET", self.path, self.headers["X-aws-ec2-metadata-token"]))
            self._reply(200, b"[job]\ncommand = 'echo from-ec2'\n")

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Imds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        found = seeds.imds_user_data(f"http://127.0.0.1:{server.server_port}/latest")
    finally:
        server.shutdown()
    assert found is not None and found.user_data is not None
    parsed = guest_agent.parse_user_data(found.user_data, found.source)
    assert parsed == {"job": {"command": "echo from-ec2"}}
    assert seen == [("PUT", "/latest/api/token", "60"), ("GET", "/latest/user-data", "token-1")]


def test_user_data_with_an_unknown_key_is_refused() -> None:
    with pytest.raises(guest_agent.ContextError, match=r"\[job\] unknown key 'comand'"):
        guest_agent.parse_user_data("[job]\ncomand = 'x'\n", "config drive")


def test_console_markers_give_mount_job_output_and_exit() -> None:
    result = boot.BootResult()
    for line in [
        "[    1.0] virtio_blk virtio1: [vda] 106496 512-byte logical blocks",
        "CVMAPPLIANCE: mounted test.example.org revision 3 at /cvmfs/x",
        "CVMAPPLIANCE: job start: hello",
        "hello from the repository",
        "CVMAPPLIANCE: job exit 0 after 0.4 s",
    ]:
        boot.feed(result, line, 12.5)
    assert result.repositories == [("test.example.org", 3)]
    assert result.job_output == ["hello from the repository"]
    assert result.job_exit == 0 and result.finished


def test_ovf_descriptor_is_well_formed_even_for_odd_names() -> None:
    text = ova.ovf_descriptor("a<b&c", "a-disk1.vmdk", 123, 52 * MiB, 512, 1)
    envelope = ET.fromstring(text)
    system = envelope.find("{http://schemas.dmtf.org/ovf/envelope/1}VirtualSystem")
    assert system is not None
    assert system.get("{http://schemas.dmtf.org/ovf/envelope/1}id") == "a<b&c"
    manifest = ova.manifest({"x.ovf": b"abc"})
    assert manifest == f"SHA256(x.ovf)= {hashlib.sha256(b'abc').hexdigest()}\n"


def test_ebs_blocks_skip_zeros_and_checksum_linearly(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = bytearray(3 * ami.BLOCK)
    data[ami.BLOCK * 2 + 5] = 1
    image.write_bytes(bytes(data) + b"tail")
    blocks = list(ami.blocks(image))
    assert [index for index, _ in blocks] == [2, 3]
    assert len(blocks[1][1]) == ami.BLOCK and blocks[1][1].startswith(b"tail")
    digests = [hashlib.sha256(b).digest() for _, b in blocks]
    expected = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    assert ami.linear_checksum(digests) == expected


def test_fat_label_reads_a_config_drive(tmp_path: Path) -> None:
    if shutil.which("mkfs.fat") is None:
        pytest.skip("dosfstools is not installed")
    image = tmp_path / "cidata.img"
    subprocess.run(["mkfs.fat", "-C", "-n", "CIDATA", str(image), "2048"], check=True,
                   capture_output=True)  # fmt: skip
    assert guest_agent.fat_label(image.read_bytes()[:512]) == "CIDATA"
    assert guest_agent.fat_label(bytes(512)) is None


# -- the built appliance (once per session) --------------------------------------------


QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "vdi": "vdi", "vmdk": "vmdk", "vhd": "vpc"}


def _qemu_img_info(path: Path, fmt: str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)],
                         check=True, capture_output=True).stdout  # fmt: skip
    info: dict[str, object] = json.loads(out)
    return info


def _disk_of(built: Built, fmt: str, scratch: Path) -> tuple[Path, str]:
    """The disk file of a format as qemu-img reads it (the vmdk inside the OVA, the .hds
    inside the Parallels bundle)."""
    return boot_disks.disk_of(built.image(fmt), scratch)


@pytest.mark.slow
def test_export_reports_each_stage_and_writes_every_format(built: Built) -> None:
    for n, stage in enumerate(["rootfs", "squashfs", "kernel", "disk image", "export ami"]):
        assert stage in built.stderr, (n, built.stderr)
    last = BUILD_STAGES + len(ALL_FORMATS)
    assert f"[{last}/{last}] export {ALL_FORMATS[-1]}: done" in built.stderr
    for fmt in ALL_FORMATS:
        assert built.image(fmt).exists(), fmt
        assert f"{fmt} " in built.stdout
    raw_size = built.image("raw").stat().st_size
    assert raw_size % MiB == 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vmdk", "ova", "hdd"])
def test_compressed_images_fit_the_thin_appliance_budget(built: Built, fmt: str) -> None:
    path = built.image(fmt)
    files = list(path.iterdir()) if path.is_dir() else [path]
    size = sum(f.stat().st_blocks * 512 for f in files)
    assert size <= 64 * MiB, f"{fmt}: {size / MiB:.1f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vdi", "vmdk", "vhd", "ova", "hdd"])
def test_each_format_converts_back_to_the_same_disk(built: Built, fmt: str, tmp_path: Path) -> None:
    path, qemu_fmt = _disk_of(built, fmt, tmp_path)
    assert qemu_fmt == {"vhd": "vpc", "ova": "vmdk", "hdd": "parallels"}.get(fmt, fmt)
    info = _qemu_img_info(path, qemu_fmt)
    assert info["format"] == qemu_fmt
    assert info["virtual-size"] == built.image("raw").stat().st_size
    if qemu_fmt in ("qcow2", "vdi", "vmdk", "parallels"):
        subprocess.run(["qemu-img", "check", "-f", qemu_fmt, str(path)], check=True,
                       capture_output=True)  # fmt: skip
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", qemu_fmt, "-O", "raw", str(path), str(back)],
                   check=True)  # fmt: skip
    subprocess.run(["cmp", str(back), str(built.image("raw"))], check=True)


@pytest.mark.slow
def test_ova_holds_descriptor_manifest_and_stream_optimized_disk(
    built: Built, tmp_path: Path
) -> None:
    with tarfile.open(built.image("ova")) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == ["cvm-thin.ovf", "cvm-thin.mf", "cvm-thin-disk1.vmdk"]
        assert all(m.isfile() and m.uid == 0 for m in members)
        content = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    for line in content["cvm-thin.mf"].decode().splitlines():
        name, digest = line.removeprefix("SHA256(").split(")= ")
        assert hashlib.sha256(content[name]).hexdigest() == digest
    ns = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1", "rasd": RASD}
    envelope = ET.fromstring(content["cvm-thin.ovf"])
    assert envelope.tag == "{http://schemas.dmtf.org/ovf/envelope/1}Envelope"
    file_ref = envelope.find("ovf:References/ovf:File", ns)
    assert file_ref is not None
    assert file_ref.get(f"{{{ns['ovf']}}}href") == "cvm-thin-disk1.vmdk"
    assert int(file_ref.get(f"{{{ns['ovf']}}}size", "0")) == len(content["cvm-thin-disk1.vmdk"])
    disk_el = envelope.find("ovf:DiskSection/ovf:Disk", ns)
    assert disk_el is not None
    assert disk_el.get(f"{{{ns['ovf']}}}format", "").endswith("#streamOptimized")
    assert int(disk_el.get(f"{{{ns['ovf']}}}capacity", "0")) == built.image("raw").stat().st_size
    hardware = envelope.find("ovf:VirtualSystem/ovf:VirtualHardwareSection", ns)
    assert hardware is not None
    types = [item.findtext("rasd:ResourceType", namespaces=ns) for item in hardware]
    assert {"3", "4", "5", "10", "17"} <= set(types)
    vmdk = tmp_path / "disk.vmdk"
    vmdk.write_bytes(content["cvm-thin-disk1.vmdk"])
    specific = _qemu_img_info(vmdk, "vmdk")["format-specific"]
    assert specific["data"]["create-type"] == "streamOptimized"  # type: ignore[index]


@pytest.mark.slow
def test_parallels_bundle_has_the_descriptor_parallels_desktop_reads(built: Built) -> None:
    bundle = built.image("hdd")
    assert bundle.is_dir()
    tree = ET.parse(bundle / "DiskDescriptor.xml").getroot()
    assert tree.tag == "Parallels_disk_image"
    image_file = tree.findtext("StorageData/Storage/Image/File")
    assert image_file == hdd.image_file_name("cvm-thin") and (bundle / image_file).exists()
    sectors = int(tree.findtext("Disk_Parameters/Disk_size") or 0)
    assert sectors * 512 == built.image("raw").stat().st_size
    assert tree.findtext("Snapshots/Shot/GUID") == tree.findtext("StorageData/Storage/Image/GUID")


@pytest.mark.slow
def test_vhd_is_fixed_with_a_footer_after_the_mib_aligned_disk(built: Built) -> None:
    vhd, raw = built.image("vhd"), built.image("raw")
    assert vhd.stat().st_size == raw.stat().st_size + 512
    with open(vhd, "rb") as f:
        f.seek(-512, os.SEEK_END)
        footer = f.read()
    assert footer[:8] == b"conectix"
    assert struct.unpack(">I", footer[60:64])[0] == 2  # disk type 2: fixed


@pytest.mark.slow
def test_image_records_its_recipe_packages_and_content_hash(built: Built, tmp_path: Path) -> None:
    record = json.loads((built.dir / "cvm-thin.build.json").read_text())
    assert len(record["rootfs_content_sha256"]) == 64
    assert record["rootfs_content_sha256"] in built.stdout
    assert "python3-cryptography" in record["packages"] and "cvmfs-client" in record["packages"]
    assert any(name.startswith("linux-image-") for name in record["kernel"])
    mbr = built.image("raw").read_bytes()[:512]
    _, ptype, lba, sectors = struct.unpack_from("<B3xB3xII", mbr, 462)
    assert ptype == 0x83
    squashfs = tmp_path / "root.squashfs"
    with open(built.image("raw"), "rb") as f:
        f.seek(lba * 512)
        squashfs.write_bytes(f.read(sectors * 512))
    for name in ("etc/cvmappliance/recipe.toml", "etc/cvmappliance/packages.txt"):
        out = subprocess.run(["unsquashfs", "-cat", str(squashfs), name], check=True,
                             capture_output=True).stdout  # fmt: skip
        assert out, name
    recipe_in_image = subprocess.run(
        ["unsquashfs", "-cat", str(squashfs), "etc/cvmappliance/recipe.toml"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    assert recipe_in_image == THIN.read_bytes()


@pytest.mark.slow
def test_ami_snapshot_holds_the_disk_and_the_image_is_registered(
    built: Built, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    record = json.loads(built.image("ami").read_text())
    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint)
    (image,) = ec2.describe_images(ImageIds=[record["image_id"]])["Images"]
    assert image["Name"] == record["name"]  # moto keeps no more of register_image's arguments
    ebs = boto3.client("ebs", endpoint_url=moto_endpoint)
    listing = ebs.list_snapshot_blocks(SnapshotId=record["snapshot_id"])
    blocks = {b["BlockIndex"]: b["BlockToken"] for b in listing["Blocks"]}
    assert len(blocks) == record["blocks_uploaded"]
    raw = built.image("raw").read_bytes()
    for index in range(0, len(raw) // ami.BLOCK):
        expected = raw[index * ami.BLOCK : (index + 1) * ami.BLOCK]
        if index not in blocks:
            assert expected == bytes(ami.BLOCK), index
            continue
        got = ebs.get_snapshot_block(
            SnapshotId=record["snapshot_id"], BlockIndex=index, BlockToken=blocks[index]
        )["BlockData"].read()
        assert got == expected, index


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "hardware", "firmware"),
    [
        ("qcow2", "virtio", "bios"),  # QEMU/KVM
        ("vdi", "sata", "bios"),  # VirtualBox: AHCI disk, e1000
        ("vmdk", "ide", "bios"),  # VMware: IDE disk, e1000
        ("raw", "virtio", "uefi"),  # OVMF: SYSLINUX's EFI loader on the same partition
    ],
)
def test_appliance_boots_mounts_the_repository_and_runs_its_program(
    built: Built,
    served_repository: Served,
    fmt: str,
    hardware: str,
    firmware: str,
    tmp_path: Path,
) -> None:
    console = tmp_path / "console.log"
    job = "python3 /cvmfs/sw.example.org/sw/hello/1.0/bin/hello.py"
    result = run_cli(
        "cvmbuild", "boot", built.image(fmt), "--repo-url", served_repository.url,
        "--repo-key", served_repository.key, "--job", job, "--hardware", hardware,
        "--firmware", firmware, "--timeout", "240", "--console-log", console,
        check=False, timeout=300,
    )  # fmt: skip
    log = console.read_text() if console.exists() else ""
    assert result.returncode == 0, (result.stderr.decode(), log[-3000:])
    assert "mounted sw.example.org revision 1" in result.stdout.decode()
    assert "job exit 0" in result.stdout.decode()
    assert "hello from the repository on cvm-thin" in log


@pytest.mark.slow
def test_boot_fails_with_the_jobs_exit_code(
    built: Built, served_repository: Served, tmp_path: Path
) -> None:
    result = run_cli(
        "cvmbuild", "boot", built.image("raw"), "--repo-url", served_repository.url,
        "--repo-key", served_repository.key, "--job", "ls /cvmfs/sw.example.org/sw; exit 3",
        "--timeout", "240", check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "job exit 3" in result.stdout.decode()
