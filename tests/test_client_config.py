"""CernVM-FS-style client settings: what an appliance's /etc file says is what mounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cvmfs_client.config import ConfigError, load_config, parse_config
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
    assert config.public_keys == ()
    assert str(config.origin("CVMFS_QUOTA_LIMIT")) == "site.conf:4"


def test_shell_quoting_comments_and_variables_read_as_sh_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITE_SQUID", "squid.site.org")
    conf = tmp_path / "etc" / "sw.conf"
    conf.parent.mkdir()
    conf.write_text(
        "export CVMFS_CACHE_BASE=/scratch/cvmfs\n"
        "STRATUM1=http://s1.example.org/cvmfs  # a helper variable, not a CVMFS_ one\n"
        'CVMFS_SERVER_URL="$STRATUM1/@fqrn@;${STRATUM1}-backup/@org@"\n'
        "CVMFS_HTTP_PROXY='http://'\"$SITE_SQUID\"':3128;DIRECT'\n"
        "CVMFS_REPOSITORY_TAG=with\\ space CVMFS_MAX_TTL=15\n"
        'CVMFS_DEBUGLOG="/var/log/cvmfs-$CVMFS_FQRN.log" # each its own\n'
        "CVMFS_PUBLIC_KEY=keys/a.pub:/etc/cvmfs/keys/b.pub\n"
        "CVMFS_REPOSITORIES='sw.example.org, atlas.cern.ch ,cms'\n"
        "CVMFS_QUOTA_LIMIT=-1\n"
        "CVMFS_KEYS_DIR=\n"
        "export CVMFS_SERVER_URL\n"
    )
    config = load_config(str(conf), "sw.example.org")
    assert config.server_url == (
        "http://s1.example.org/cvmfs/sw.example.org;http://s1.example.org/cvmfs-backup/sw"
    )
    assert config.http_proxy == "http://squid.site.org:3128;DIRECT"
    assert config.tag == "with space"
    assert config.max_ttl_s == 15 * 60  # minutes, as in CernVM-FS
    assert config.debuglog == "/var/log/cvmfs-sw.example.org.log"
    # Relative paths start at the file's directory: CernVM-FS sources each from there.
    assert config.public_keys == (str(conf.parent / "keys/a.pub"), "/etc/cvmfs/keys/b.pub")
    assert config.repositories == ("sw.example.org", "atlas.cern.ch", "cms")
    assert config.quota_bytes is None  # -1: no limit
    assert config.keys_dir is None  # an empty value is no value
    assert config.ignored == ()  # STRATUM1 is a shell variable, not a parameter


def test_parameters_the_client_does_not_implement_are_kept_and_reported_as_ignored() -> None:
    config = parse_config(
        "CVMFS_CLIENT_PROFILE=single\nCVMFS_SERVER_URL=http://s1/repo\nCVMFS_USE_GEOAPI=yes\n",
        "default.local",
    )
    assert config.server_url == "http://s1/repo"
    assert [(a.key, a.value, str(a.origin)) for a in config.ignored] == [
        ("CVMFS_CLIENT_PROFILE", "single", "default.local:1"),
        ("CVMFS_USE_GEOAPI", "yes", "default.local:3"),
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("CVMFS_QUOTA_LIMIT=lots\n", "site.conf:1: CVMFS_QUOTA_LIMIT must be a whole number"),
        ("just words\n", "site.conf:1: expected KEY=VALUE"),
        ('CVMFS_SERVER_URL="unterminated\n', "site.conf:1: CVMFS_SERVER_URL: unterminated"),
        ("CVMFS_CACHE_BASE=two words\n", "site.conf:1: CVMFS_CACHE_BASE needs exactly one value"),
        ("\nCVMFS_HTTP_PROXY=p1;p2\n", "site.conf:2: CVMFS_HTTP_PROXY: unquoted ';'"),
        ("CVMFS_HTTP_PROXY=squid:3128\n", "site.conf:1: CVMFS_HTTP_PROXY proxy 'squid:3128'"),
        ("CVMFS_SERVER_URL=$(cat url)\n", "site.conf:1: CVMFS_SERVER_URL: command substitution"),
        ('if [ "$X" = y ]; then\n', "site.conf:1: expected KEY=VALUE"),
        ("CVMFS_SYSLOG_FACILITY=9\n", "site.conf:1: CVMFS_SYSLOG_FACILITY must be 0 to 7"),
        ("CVMFS_REPOSITORIES=a,../b\n", "site.conf:1: CVMFS_REPOSITORIES lists '../b'"),
    ],
)
def test_a_bad_setting_names_the_file_line_and_key(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace("$", r"\$")):
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
        "CVMFS_CLAIM_OWNERSHIP=yes\n"
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli("cvmfs-client", "mount", mountpoint, "--config", conf)
    try:
        assert (mountpoint / "sw" / "setup.sh").read_text() == "echo configured\n"
        stat = run_cli("cvmfs-client", "stat", mountpoint).stdout.decode()
        assert f"cache_quota:       {100 * 1024 * 1024}" in stat
        assert str(tmp_path / "cache" / repo.name / "objects") in stat
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    assert result.stderr.decode() == (
        f"warning: {conf}:5: CVMFS_CLAIM_OWNERSHIP is not implemented by cvmfs-client; ignored\n"
    )
    bad = tmp_path / "bad.conf"
    bad.write_text("CVMFS_SERVER_URL=/x\nCVMFS_QUOTA_LIMIT=4G\n")
    result = run_cli("cvmfs-client", "mount", mountpoint, "--config", bad, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().startswith(
        f"error: {bad}:2: CVMFS_QUOTA_LIMIT must be a whole number, got '4G'"
    )
