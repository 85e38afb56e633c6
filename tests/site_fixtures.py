"""A site as CernVM-FS sites are run: repositories under one Stratum 1 URL
(`http://HOST/cvmfs/<name>`, served here by nginx) and a layered client configuration
directory, with the site's own default.local."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo_server.repository import LocalRepository
from tests.conftest import Nginx, run_cli, serving_nginx

# What the site's configuration management writes, as sites write it.
DEFAULT_LOCAL = """\
# /etc/cvmfs-client/default.local: written by the site's Puppet, do not edit
CVMFS_REPOSITORIES=sw.example.org,data.example.org
CVMFS_HTTP_PROXY="http://squid1:3128|http://squid2:3128;DIRECT"
CVMFS_QUOTA_LIMIT=20000
CVMFS_CACHE_BASE={cache}
CVMFS_CLIENT_PROFILE=single
CVMFS_USE_GEOAPI=yes
"""


@dataclass
class Site:
    etc: Path  # the client's configuration directory
    srv: Path  # what nginx serves: cvmfs/<name>/ is each repository
    stratum1: str  # http://127.0.0.1:PORT/cvmfs
    cache: Path  # CVMFS_CACHE_BASE
    keys: Path  # where repo-server init wrote each repository's keys: keys/<name>/

    def add_repository(self, name: str, files: dict[str, str]) -> Path:
        """A new repository under the Stratum 1, its files published; returns its
        master public key (keys/<name>/<name>.pub)."""
        LocalRepository.init(self.srv / "cvmfs" / name, name, self.keys / name)
        src = self.srv.parent / f"src-{name}"
        for relpath, text in files.items():
            (src / relpath).parent.mkdir(parents=True, exist_ok=True)
            (src / relpath).write_text(text)
        repo = self.srv / "cvmfs" / name
        run_cli(
            "cvmbuild", "publish", src, "--repo", repo, "--keys", self.keys / name, "--path", "/sw"
        )
        return self.keys / name / f"{name}.pub"

    def write(self, relpath: str, text: str) -> Path:
        path = self.etc / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def stratum1_server(root: str, listen: str) -> str:
    """Every repository of a Stratum 1 under /cvmfs/<name>/, as CernVM-FS's are."""
    return (
        f"server {{\n    listen {listen};\n    root {root};\n"
        "    default_type application/octet-stream;\n"
        "    location /cvmfs/ { }\n    location / { return 404; }\n}\n"
    )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Two repositories of the example.org domain served by nginx, and the configuration
    a site would have: the package's default.conf, a default.d drop-in, the site's
    default.local, the domain's file (its Stratum 1s, of which the first is down, and its
    keys directory, given relative to domain.d/ as CernVM-FS allows)."""
    site = Site(
        etc=tmp_path / "etc-cvmfs", srv=tmp_path / "srv", stratum1="",
        cache=tmp_path / "cache", keys=tmp_path / "keys",
    )  # fmt: skip
    for name, files in (
        ("sw.example.org", {"setup.sh": "echo sw 1.0\n", "bin/run.py": "print('run')\n"}),
        ("data.example.org", {"README": "calibration data\n"}),
    ):
        key = site.add_repository(name, files)
        (site.etc / "keys" / "example.org").mkdir(parents=True, exist_ok=True)
        shutil.copy(key, site.etc / "keys" / "example.org" / key.name)
    with serving_nginx(site.srv, tmp_path / "nginx", stratum1_server) as nginx:
        site.stratum1 = f"{nginx.url}/cvmfs"
        write_site_configuration(site, nginx)
        yield site


def write_site_configuration(site: Site, nginx: Nginx) -> None:
    site.write(
        "default.conf",
        "# shipped with the client; sites override in default.local\n"
        "CVMFS_CACHE_BASE=/var/lib/cvmfs-client/cache\n"
        "CVMFS_QUOTA_LIMIT=4000\n"
        "CVMFS_MOUNT_DIR=/cvmfs\n",
    )
    site.write("default.d/50-example.conf", "CVMFS_DEFAULT_DOMAIN=example.org\n")
    site.write("default.local", DEFAULT_LOCAL.format(cache=site.cache))
    site.write(
        "domain.d/example.org.conf",
        f'CVMFS_SERVER_URL="http://127.0.0.1:1/cvmfs/@fqrn@;{site.stratum1}/@fqrn@"\n'
        "CVMFS_KEYS_DIR=../keys/example.org\n",
    )
