"""A site's layered configuration, as CernVM-FS sites write it, is what mounts:
`cvmfs-client mount NAME`, `config showconfig`, `config probe`, `config chksetup`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from cvmfs_client.site_config import repository_config
from tests.conftest import mounted_with, run_cli
from tests.site_fixtures import Site

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def layer_variable(relpath: str) -> str:
    return "LAYER_" + re.sub(r"\W", "_", relpath).upper()


def test_the_layers_are_read_in_cernvm_fs_order_the_later_winning(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    layers = [
        "default.conf", "default.d/10-a.conf", "default.d/20-b.conf", "default.local",
        "domain.d/example.org.conf", "domain.d/example.org.local",
        "config.d/sw.example.org.conf", "config.d/sw.example.org.local",
    ]  # fmt: skip
    for index, relpath in reversed(list(enumerate(layers))):
        (etc / relpath).parent.mkdir(parents=True, exist_ok=True)
        # Each file appends its number, and sets its own variable and every later one's.
        text = "".join(f"{layer_variable(later)}=from-{relpath}\n" for later in layers[index:])
        (etc / relpath).write_text(f"CVMFS_REPOSITORY_TAG=$CVMFS_REPOSITORY_TAG,{index}\n{text}")
    (etc / "domain.d" / "other.org.conf").write_text("CVMFS_REPOSITORY_TAG=wrong-domain\n")
    (etc / "config.d" / "data.example.org.conf").write_text("CVMFS_REPOSITORY_TAG=wrong-repo\n")
    (etc / "default.d" / "30-c.local").write_text("CVMFS_REPOSITORY_TAG=not-a-conf\n")

    assert repository_config(str(etc), "sw").repository == "sw"  # no default domain set
    config = repository_config(str(etc), "sw.example.org")
    assert config.tag == ",0,1,2,3,4,5,6,7"
    assert str(config.origin("CVMFS_REPOSITORY_TAG")) == f"{etc}/config.d/sw.example.org.local:1"
    for relpath in layers:
        variable = layer_variable(relpath)
        assert next(a.value for a in config.effective if a.key == variable) == f"from-{relpath}"
        assert config.origin(variable).file == str(etc / relpath)  # type: ignore[union-attr]


@needs_fuse
def test_a_site_mounts_a_repository_by_name_with_its_default_local(
    site: Site, tmp_path: Path
) -> None:
    site.write("config.d/sw.example.org.local", "CVMFS_MAX_TTL=5\n")
    mountpoint = tmp_path / "cvmfs" / "sw.example.org"
    mountpoint.parent.mkdir()
    with mounted_with("sw.example.org", mountpoint, "--config-dir", site.etc) as result:
        assert (mountpoint / "sw" / "setup.sh").read_text() == "echo sw 1.0\n"
        stat = json.loads(os.getxattr(mountpoint, "user.stats"))
        assert stat["repository"] == "sw.example.org"
        assert stat["cache_dir"] == str(site.cache / "sw.example.org" / "objects")
        assert stat["cache_quota"] == 20000 * 1024 * 1024  # default.local's, in MB
        # The first Stratum 1 is down and neither squid resolves: DIRECT to the second.
        assert stat["host"] == f"{site.stratum1}/sw.example.org"
        assert stat["proxy"] == "DIRECT"
    default_local = site.etc / "default.local"
    assert result.stderr.decode().splitlines() == [
        f"warning: {default_local}:6: CVMFS_CLIENT_PROFILE is not implemented by cvmfs-client; "
        "ignored",
        f"warning: {default_local}:7: CVMFS_USE_GEOAPI is not implemented by cvmfs-client; ignored",
    ]


def test_showconfig_prints_each_effective_value_and_the_file_line_it_came_from(
    site: Site,
) -> None:
    site.write("config.d/sw.example.org.local", "CVMFS_MAX_TTL=5\nCVMFS_QUOTA_LIMIT=-1\n")
    text = run_cli("cvmfs-client", "config", "showconfig", "sw", "--config-dir", site.etc)
    lines = text.stdout.decode().splitlines()
    domain = site.etc / "domain.d" / "example.org.conf"
    local = site.etc / "config.d" / "sw.example.org.local"
    assert lines[0] == "CVMFS_REPOSITORY_NAME=sw.example.org"
    assert (
        f"CVMFS_SERVER_URL='http://127.0.0.1:1/cvmfs/sw.example.org;{site.stratum1}/sw.example.org'"
        f"    # from {domain}:1"
    ) in lines
    assert f"CVMFS_QUOTA_LIMIT=-1    # from {local}:2" in lines
    assert f"CVMFS_MAX_TTL=5    # from {local}:1" in lines
    assert (
        f"CVMFS_USE_GEOAPI=yes    # from {site.etc}/default.local:7 "
        "(ignored: not implemented by cvmfs-client)"
    ) in lines
    assert [line.split("=")[0] for line in lines[1:]] == sorted(
        line.split("=")[0] for line in lines[1:]
    )

    document = json.loads(
        run_cli(
            "cvmfs-client", "config", "showconfig", "sw.example.org", "--json", "--config-dir",
            site.etc,
        ).stdout
    )  # fmt: skip
    settings = document["settings"]
    assert document["repository"] == "sw.example.org"
    assert document["files"] == [
        str(site.etc / f) for f in (
            "default.conf", "default.d/50-example.conf", "default.local",
            "domain.d/example.org.conf", "config.d/sw.example.org.local",
        )
    ]  # fmt: skip
    assert settings["CVMFS_QUOTA_LIMIT"] == {
        "value": "-1", "source": f"{local}:2", "ignored": False,
    }  # fmt: skip
    assert settings["CVMFS_CACHE_BASE"]["source"] == f"{site.etc}/default.local:5"
    assert settings["CVMFS_KEYS_DIR"] == {
        "value": "../keys/example.org", "source": f"{domain}:2", "ignored": False,
    }  # fmt: skip
    assert settings["CVMFS_CLIENT_PROFILE"]["ignored"] is True

    every = json.loads(
        run_cli("cvmfs-client", "config", "showconfig", "--json", "--config-dir", site.etc).stdout
    )
    assert [d["repository"] for d in every] == ["sw.example.org", "data.example.org"]


@needs_fuse
def test_a_repository_serving_another_name_than_configured_is_refused(
    site: Site, tmp_path: Path
) -> None:
    """The URL of acc.test, with acc.test's key among the domain's keys: the key fits
    the whitelist, the name does not."""
    other = site.add_repository("acc.test", {"x": "other\n"})
    shutil.copy(other, site.etc / "keys" / "example.org" / "acc.test.pub")
    site.write("config.d/sw.example.org.conf", f"CVMFS_SERVER_URL={site.stratum1}/acc.test\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli(
        "cvmfs-client", "mount", "sw.example.org", mountpoint, "--config-dir", site.etc,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    error = result.stderr.decode().splitlines()[-1]
    assert error.startswith("error: ")
    assert "serves repository 'acc.test', not 'sw.example.org'" in error
    assert not os.path.ismount(mountpoint)


@needs_fuse
def test_the_key_is_the_one_of_the_keys_directory_that_signs_the_repository(
    site: Site, tmp_path: Path
) -> None:
    """As in CernVM-FS's keys/cern.ch/: the files are named after the domain, not the
    repository, and the client tries each."""
    domain_keys = tmp_path / "domain-keys"
    domain_keys.mkdir()
    shutil.copy(site.keys / "data.example.org" / "data.example.org.pub", domain_keys / "a.pub")
    shutil.copy(site.keys / "sw.example.org" / "sw.example.org.pub", domain_keys / "b.pub")
    site.write("config.d/sw.example.org.conf", f"CVMFS_KEYS_DIR={domain_keys}\n")
    with mounted_with("sw.example.org", tmp_path / "mnt", "--config-dir", site.etc):
        assert (tmp_path / "mnt" / "sw" / "bin" / "run.py").read_text() == "print('run')\n"
    # CVMFS_PUBLIC_KEY wins over CVMFS_KEYS_DIR, as in CernVM-FS: here the wrong key.
    site.write(
        "config.d/sw.example.org.local",
        f"CVMFS_PUBLIC_KEY={domain_keys / 'a.pub'}:../keys/example.org/data.example.org.pub\n",
    )
    result = run_cli(
        "cvmfs-client", "mount", "sw.example.org", tmp_path / "mnt", "--config-dir", site.etc,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: sw.example.org: cannot tell which of " in result.stderr.decode()
    assert "signed by none of the 2 keys" in result.stderr.decode()


@needs_fuse
def test_probe_mounts_each_repository_reads_its_root_and_unmounts(site: Site) -> None:
    result = run_cli("cvmfs-client", "config", "probe", "--config-dir", site.etc)
    assert result.stdout.decode().splitlines() == [
        "Probing sw.example.org... OK, 1 entries in its root",
        "Probing data.example.org... OK, 1 entries in its root",
    ]
    result = run_cli(
        "cvmfs-client", "config", "probe", "sw", "gone", "--config-dir", site.etc, check=False
    )
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "Probing sw.example.org... OK, 1 entries in its root"
    assert lines[1].startswith("Probing gone.example.org... Failed! (")
    assert "/cvmfs/gone.example.org/whitelist: not found (HTTP 404)" in lines[1]
    assert "cvmfs-client-probe" not in Path("/proc/mounts").read_text()


def test_chksetup_checks_fuse_the_cache_the_keys_and_the_proxies(
    site: Site, tmp_path: Path
) -> None:
    with socket.socket() as squid:  # something that accepts connections, as a squid does
        squid.bind(("127.0.0.1", 0))
        squid.listen()
        proxy = f"http://127.0.0.1:{squid.getsockname()[1]}"
        site.write(
            "default.local",
            f"CVMFS_REPOSITORIES=sw.example.org\nCVMFS_HTTP_PROXY='{proxy};DIRECT'\n"
            f"CVMFS_CACHE_BASE={site.cache}\nCVMFS_QUOTA_LIMIT=100\n",
        )
        result = run_cli("cvmfs-client", "config", "chksetup", "--config-dir", site.etc)
        lines = result.stdout.decode().splitlines()
        key = site.etc / "keys" / "example.org" / "sw.example.org.pub"
        assert lines[0] == "OK    /dev/fuse: present, readable and writable"
        assert lines[1].startswith("OK    fusermount: /")
        assert lines[2].startswith("OK    libfuse: libfuse")
        assert lines[3].startswith("OK    sw.example.org CVMFS_SERVER_URL: http://127.0.0.1:1/")
        assert lines[4].startswith(f"OK    cache {site.cache}/sw.example.org: writable, ")
        assert lines[4].endswith(" free, quota 100.0 MiB")
        assert any(line.startswith(f"OK    key {key}: Ed25519 public key ") for line in lines)
        assert f"OK    proxy {proxy}: accepts connections" in lines
        assert "OK    proxy DIRECT: no proxy" in lines
        assert len(lines) == 9

        (site.etc / "keys" / "example.org" / "broken.pub").write_text("not a key\n")
        site.write(
            "config.d/sw.example.org.local",
            f'CVMFS_HTTP_PROXY="{proxy}|http://squid2:3128"\nCVMFS_QUOTA_LIMIT=1000000000\n',
        )
        result = run_cli(
            "cvmfs-client", "config", "chksetup", "sw", "--config-dir", site.etc, check=False
        )
    assert result.returncode == 1
    failures = [line for line in result.stdout.decode().splitlines() if line.startswith("FAIL")]
    assert len(failures) == 3
    assert failures[0].startswith(f"FAIL  cache {site.cache}/sw.example.org: quota 953.7 TiB")
    assert failures[0].endswith(": lower CVMFS_QUOTA_LIMIT")
    broken = site.etc / "keys" / "example.org" / "broken.pub"
    assert failures[1] == f"FAIL  key {broken}: {broken}: not a PEM public key"
    assert failures[2].startswith("FAIL  proxy http://squid2:3128: ")
