"""Contextualisation as a cloud user writes it, read without booting: #cloud-config,
MIME multipart, NoCloud and OpenStack meta-data, the labels of seed drives made by the
tools users make them with (cloud-localds, mkfs.vfat, mkfs.ext4); and `cvmbuild boot`'s
flags that need no guest: its QEMU command line and its refusal of a non-image.
"""

from __future__ import annotations

import base64
import gzip
import http.server
import shutil
import subprocess
import threading
import time
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from cvmbuild.appliance import boot, cache_disk, cloud_config, context, seeds
from cvmbuild.appliance.errors import BootError
from cvmbuild.boinc import accel, vm
from tests.conftest import run_cli

KEY = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
KEY_BLOCK = "".join(f"      {line}\n" for line in KEY.splitlines())
BLOB = base64.b64encode(b"\x00\x01binary").decode()
RECIPE = context.Settings(
    hostname="cvm-thin",
    repositories=[
        context.RepoSettings("sw.example.org", "http://10.0.2.2:8000", "/cvmfs/sw.example.org")
    ],
    job="ls /cvmfs",
)

CLOUD_CONFIG = f"""#cloud-config
hostname: analysis-7
cvmfs:
  http_proxy: "http://squid:3128;DIRECT"
  server_url: http://stratum1.example.org/cvmfs/@fqrn@
  repositories:
    - sw.example.org
    - name: acc.test
      mount_point: /opt/acc
  keys:
    acc.test: |
{KEY_BLOCK}
write_files:
  - path: /etc/motd
    content: welcome
    permissions: '0600'
  - path: /root/data.bin
    encoding: b64
    content: {BLOB}
runcmd:
  - echo first
  - [python3, -c, "print('two words')"]
ssh_authorized_keys:
  - ssh-ed25519 AAAAC3 user@laptop
"""


def read(text: str) -> tuple[context.UserData, context.Settings]:
    data = context.read_user_data(text, "user-data")
    settings = context.apply_overrides(RECIPE, data.tables)
    if data.cloud is not None:
        settings = context.apply_cloud_config(settings, data.cloud)
    return data, settings


def test_a_cloud_config_names_repositories_proxy_server_and_keys() -> None:
    data, settings = read(CLOUD_CONFIG)
    assert data.format == "#cloud-config"
    assert data.keys == ("hostname", "cvmfs", "write_files", "runcmd", "ssh_authorized_keys")
    sw, acc = settings.repositories
    assert (sw.name, sw.url, sw.mount_point) == (
        "sw.example.org",
        "http://stratum1.example.org/cvmfs/sw.example.org",
        "/cvmfs/sw.example.org",
    )
    assert (acc.name, acc.mount_point, acc.public_key) == ("acc.test", "/opt/acc", KEY)
    assert sw.proxy == acc.proxy == "http://squid:3128;DIRECT"
    assert settings.hostname == "analysis-7"
    assert data.cloud is not None
    motd, blob = data.cloud.write_files
    assert (motd.path, motd.content, motd.permissions) == ("/etc/motd", b"welcome", 0o600)
    assert blob.content == b"\x00\x01binary"
    assert data.cloud.ssh_authorized_keys == ("ssh-ed25519 AAAAC3 user@laptop",)


def test_runcmd_becomes_the_job_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    data, settings = read(CLOUD_CONFIG)
    assert data.cloud is not None
    assert settings.job == f"/bin/sh {context.RUNCMD_DIR}/runcmd"
    script = tmp_path / "runcmd"
    script.write_text(context.runcmd_script(data.cloud).replace("python3", "echo"))
    out = subprocess.run(["sh", script], capture_output=True, text=True)
    assert out.stdout == "first\n-c print('two words')\n"
    script.write_text(context.runcmd_script(cloud_config.CloudConfig(runcmd=("false", "echo no"))))
    out = subprocess.run(["sh", script], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""


def test_without_a_cvmfs_section_the_recipes_repositories_stay() -> None:
    _, settings = read("#cloud-config\nruncmd: [ls /cvmfs]\n")
    assert settings.repositories == RECIPE.repositories


def test_cernvm_fs_spelling_is_understood_in_the_cvmfs_section() -> None:
    text = (
        "#cloud-config\ncvmfs:\n  CVMFS_REPOSITORIES: sw.example.org,acc.test\n"
        "  CVMFS_SERVER_URL: http://s1/cvmfs/@fqrn@\n  CVMFS_HTTP_PROXY: DIRECT\n"
    )
    _, settings = read(text)
    assert [(r.name, r.url, r.mount_point) for r in settings.repositories] == [
        ("sw.example.org", "http://s1/cvmfs/sw.example.org", "/cvmfs/sw.example.org"),
        ("acc.test", "http://s1/cvmfs/acc.test", "/cvmfs/acc.test"),
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("#cloud-config\npackages: [htop]\n", "user-data: #cloud-config unknown key 'packages'"),
        ("#cloud-config\ncvmfs:\n  proxies: DIRECT\n", "cvmfs: unknown key 'proxies'"),
        (
            "#cloud-config\ncvmfs:\n  repositories:\n    - {name: a.org, mountpoint: /a}\n",
            r"cvmfs.repositories\[0\]: unknown key 'mountpoint'",
        ),
        ("#cloud-config\nwrite_files:\n  - {path: /a, mode: '0644'}\n", "unknown key 'mode'"),
        ("#cloud-config\ncvmfs:\n  repositories: [new.org]\n", "new.org has no url"),
        ("#cloud-config\nruncmd: echo\n", r"runcmd: must be a list"),
        ("#cloud-config\nhostname: [a\n", "not valid YAML"),
        ("#cloud-config\ncopilot:\n  tokn: x\n", r"\[copilot\] unknown key 'tokn'"),
        ("#cloud-config\ncvmfs:\n  repositories: ['../etc']\n", "not a repository name"),
    ],
)
def test_unknown_or_malformed_cloud_config_is_refused_naming_the_key(text: str, says: str) -> None:
    with pytest.raises(context.ContextError, match=says):
        read(text)


def test_mime_multipart_user_data_merges_its_cloud_config_and_scripts() -> None:
    message = MIMEMultipart()
    message.attach(MIMEText("#cloud-config\nhostname: from-mime\n", "cloud-config"))
    message.attach(MIMEText("#!/bin/sh\necho from a script\n", "x-shellscript"))
    message.attach(MIMEText("#cloud-config\nruncmd: [echo hi]\n", "plain"))
    data, settings = read(message.as_string())
    assert data.format == "MIME multipart (#cloud-config, script, #cloud-config)"
    assert data.cloud is not None and data.cloud.scripts == ("#!/bin/sh\necho from a script\n",)
    assert settings.hostname == "from-mime"
    assert context.runcmd_script(data.cloud).splitlines()[-2:] == [
        "echo hi",
        f"{context.RUNCMD_DIR}/script-0",
    ]
    bad = MIMEMultipart()
    bad.attach(MIMEText("http://example.org/x", "x-include-url"))
    with pytest.raises(context.ContextError, match="text/x-include-url is not supported"):
        read(bad.as_string())


def test_the_appliances_toml_keeps_working() -> None:
    data, settings = read('[repository]\nurl = "http://mirror:80"\n[job]\ncommand = "true"\n')
    assert data.format == "TOML" and data.keys == ("[repository]", "[job]")
    assert settings.repositories[0].url == "http://mirror:80" and settings.job == "true"


def test_a_new_repository_from_user_data_needs_its_name() -> None:
    with pytest.raises(context.ContextError, match="give its url and its name"):
        context.apply_overrides(context.Settings(), {"repository": {"url": "http://x"}})
    settings = context.apply_overrides(
        context.Settings(), {"repository": {"url": "http://x", "name": "acc.test"}}
    )
    assert settings.repositories[0].mount_point == "/cvmfs/acc.test"


def test_write_files_decodes_gzip_and_refuses_a_relative_path() -> None:
    packed = base64.b64encode(gzip.compress(b"zipped")).decode()
    data, _ = read(
        f"#cloud-config\nwrite_files:\n  - {{path: /z, encoding: gz+b64, content: {packed}}}\n"
    )
    assert data.cloud is not None and data.cloud.write_files[0].content == b"zipped"
    with pytest.raises(context.ContextError, match="must be an absolute path"):
        read("#cloud-config\nwrite_files:\n  - {path: etc/x, content: y}\n")


def test_meta_data_gives_the_hostname_and_keys_in_both_formats() -> None:
    nocloud = cloud_config.parse_meta_data(
        "instance-id: i-1\nlocal-hostname: node-3\n", "meta-data", json_format=False
    )
    assert (nocloud.hostname, nocloud.instance_id) == ("node-3", "i-1")
    openstack = cloud_config.parse_meta_data(
        '{"uuid": "u-9", "hostname": "vm-9", "public_keys": {"me": "ssh-rsa AAA me"}}',
        "meta_data.json",
        json_format=True,
    )
    assert (openstack.hostname, openstack.public_keys) == ("vm-9", ("ssh-rsa AAA me",))
    with pytest.raises(cloud_config.UserDataError, match="meta_data.json: not valid JSON"):
        cloud_config.parse_meta_data("{", "meta_data.json", json_format=True)


# -- seed drives and the cache disk, as the tools users have make them ---------------------


def needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: run.sh installs it (SYSTEM_PACKAGES)")


def test_a_cloud_localds_seed_is_found_by_its_iso9660_label(tmp_path: Path) -> None:
    needs("cloud-localds")
    (tmp_path / "user-data").write_text("#cloud-config\nruncmd: [true]\n")
    (tmp_path / "meta-data").write_text("instance-id: i-1\n")
    seed = tmp_path / "seed.iso"
    subprocess.run(["cloud-localds", seed, tmp_path / "user-data", tmp_path / "meta-data"],
                   check=True, capture_output=True)  # fmt: skip
    head = seeds.read_head(str(seed))
    assert head is not None and seeds.probe(head) == ("iso9660", "cidata")


def test_fat_and_ext4_labels_are_read_and_an_empty_disk_is_recognised(tmp_path: Path) -> None:
    needs("mkfs.vfat")
    needs("mkfs.ext4")
    fat = tmp_path / "config2.img"
    subprocess.run(["mkfs.vfat", "-C", "-n", "CONFIG-2", fat, "2048"], check=True,
                   capture_output=True)  # fmt: skip
    assert seeds.probe(fat.read_bytes()[: seeds.HEAD]) == ("vfat", "CONFIG-2")
    ext = tmp_path / "cache.img"
    ext.write_bytes(bytes(8 * 1024 * 1024))
    assert cache_disk.is_empty(ext.read_bytes()[: cache_disk.EMPTY_PROBE])
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", cache_disk.LABEL, ext], check=True)
    head = ext.read_bytes()[: cache_disk.EMPTY_PROBE]
    assert seeds.probe(head) == ("ext4", "CVMCACHE") and not cache_disk.is_empty(head)
    assert seeds.probe(bytes(seeds.HEAD)) is None


def test_user_data_and_meta_data_come_from_the_openstack_metadata_service() -> None:
    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = {
                "/openstack/latest/user_data": b"#cloud-config\nhostname: os-1\n",
                "/openstack/latest/meta_data.json": b'{"hostname": "meta-1"}',
            }.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        found = seeds.openstack_user_data(f"http://127.0.0.1:{server.server_port}/openstack/latest")
    finally:
        server.shutdown()
    assert found is not None and found.meta_json
    assert found.user_data == "#cloud-config\nhostname: os-1\n"
    assert cloud_config.parse_meta_data(found.meta_data, "m", True).hostname == "meta-1"


# -- cvmbuild boot's flags -------------------------------------------------------------------


def test_a_file_that_is_not_a_disk_image_is_refused_at_once(tmp_path: Path) -> None:
    for name in ("notes.txt", "notes.qcow2"):
        path = tmp_path / name
        path.write_text("these are my notes, not an image\n")
        started = time.monotonic()
        result = run_cli("cvmbuild", "boot", path, "--job", "true", check=False)
        assert time.monotonic() - started < 10
        assert result.returncode == 1
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not a"), lines


def test_qemu_gets_a_modern_cpu_the_cpus_and_forwarded_ports(tmp_path: Path) -> None:
    command = boot.qemu_command(
        tmp_path / "d.qcow2", "qcow2", None, 512, "virtio",
        accel=accel.choose("tcg"), cpus=2, forwards=("8080:80", "2222:22"),
    )  # fmt: skip
    assert command[command.index("-cpu") + 1] == "max"
    assert command[command.index("-accel") + 1] == "tcg"
    assert command[command.index("-smp") + 1] == "2"
    netdev = command[command.index("-netdev") + 1]
    assert netdev.endswith(",hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22")
    argv = vm.qemu_argv(512, 1, True, "pc")  # the BOINC VM: the same default CPU
    assert argv[argv.index("-cpu") + 1] == "max"
    with pytest.raises(BootError, match="--forward '80': write HOST_PORT:GUEST_PORT"):
        boot.parse_forward("80")


def test_accel_choices_are_checked_and_tcg_needs_no_probe() -> None:
    assert accel.choose("tcg", "Haswell").args() == ["-accel", "tcg", "-cpu", "Haswell"]
    with pytest.raises(accel.AccelError, match="--accel xen: choose one of auto, kvm, tcg"):
        accel.choose("xen")
    chosen = accel.choose("auto")
    assert chosen.name in ("kvm", "tcg") and chosen.why
