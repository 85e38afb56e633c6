"""CernVM-FS-style client settings: what an appliance's /etc file says is what mounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cvmfs_client.config import ConfigError, parse_config
from tests.conftest import Repo, run_cli


def test_a_cernvm_fs_style_file_becomes_typed_settings() -> None:
    config = parse_config(
        "# site settings\n"
        'CVMFS_SERVER_URL="http://s1.example.org/repo;http://s2.example.org/repo"\n'
        "export CVMFS_HTTP_PROXY='http://p1:3128|http://p2:3128;DIRECT'\n"
        "CVMFS_QUOTA_LIMIT=4000  # MB\n"
        "CVMFS_CACHE_BASE=/var/cache/cvmfs\n",
        "site.conf",
    )
    assert config.server_url == "http://s1.example.org/repo;http://s2.example.org/repo"
    assert config.http_proxy == "http://p1:3128|http://p2:3128;DIRECT"
    assert config.quota_bytes == 4000 * 1024 * 1024
    assert config.cache_base == "/var/cache/cvmfs"
    assert config.public_key is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (
            "CVMFS_SERVER_URL=a\nCVMFS_NO_SUCH_THING=1\n",
            "site.conf:2: unknown setting CVMFS_NO_SUCH_THING",
        ),
        ("CVMFS_QUOTA_LIMIT=lots\n", "site.conf:1: CVMFS_QUOTA_LIMIT must be a whole number"),
        ("just words\n", "site.conf:1: expected KEY=VALUE"),
        ('CVMFS_SERVER_URL="unterminated\n', "site.conf:1: CVMFS_SERVER_URL"),
        ("CVMFS_CACHE_BASE=two words\n", "site.conf:1: CVMFS_CACHE_BASE needs exactly one value"),
    ],
)
def test_a_bad_setting_names_the_file_line_and_key(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_config(text, "site.conf")


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mount_takes_url_key_and_cache_from_the_config_file(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "setup.sh").write_text("echo configured\n")
    run_cli("cvmbuild", "publish", src, "--repo", repo.dir, "--path", "/sw")
    conf = tmp_path / "client.conf"
    conf.write_text(
        f"CVMFS_SERVER_URL={repo.dir}\nCVMFS_PUBLIC_KEY={repo.pub}\n"
        f"CVMFS_CACHE_BASE={tmp_path / 'cache'}\nCVMFS_QUOTA_LIMIT=100\n"
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run_cli("cvmfs-client", "mount", mountpoint, "--config", conf)
    try:
        assert (mountpoint / "sw" / "setup.sh").read_text() == "echo configured\n"
        stat = run_cli("cvmfs-client", "stat", mountpoint).stdout.decode()
        assert f"cache_quota:       {100 * 1024 * 1024}" in stat
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    bad = tmp_path / "bad.conf"
    bad.write_text("CVMFS_SERVER_URL=x\nCVMFS_TYPO=1\n")
    result = run_cli("cvmfs-client", "mount", mountpoint, "--config", bad, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"error: {bad}:2: unknown setting CVMFS_TYPO")
