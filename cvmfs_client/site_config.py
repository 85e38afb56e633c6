"""A site's configuration directory, laid out and read as CernVM-FS reads /etc/cvmfs.

For a repository sw.example.org, later files win:
    default.conf, default.d/*.conf (sorted), default.local,
    domain.d/example.org.conf, domain.d/example.org.local,
    config.d/sw.example.org.conf, config.d/sw.example.org.local
(CernVM-FS's config repository layer is not read.)
"""

from __future__ import annotations

import glob
import os

from cvmfs_client.config import (
    ClientConfig,
    ConfigError,
    check_repository_name,
    config_from,
    fqrn_variables,
    read_file,
)
from cvmfs_client.config_syntax import Assignment

DEFAULT_CONFIG_DIR = "/etc/cvmfs-client"
DEFAULT_MOUNT_DIR = "/cvmfs"


def layer_files(config_dir: str, fqrn: str | None) -> list[str]:
    """The files that configure fqrn (None: the defaults only) that exist, in order."""
    files = [
        os.path.join(config_dir, "default.conf"),
        *sorted(glob.glob(os.path.join(glob.escape(config_dir), "default.d", "*.conf"))),
        os.path.join(config_dir, "default.local"),
    ]
    if fqrn is not None:
        domain = fqrn.partition(".")[2]
        for stem in ([f"domain.d/{domain}"] if domain else []) + [f"config.d/{fqrn}"]:
            files += [
                os.path.join(config_dir, f"{stem}.conf"),
                os.path.join(config_dir, f"{stem}.local"),
            ]
    return [f for f in files if os.path.isfile(f)]


def _read_layers(config_dir: str, fqrn: str | None) -> ClientConfig:
    if not os.path.isdir(config_dir):
        raise ConfigError(
            f"{config_dir}: no such configuration directory (give --config-dir, e.g. /etc/cvmfs)"
        )
    variables = fqrn_variables(fqrn)
    assignments: list[Assignment] = []
    for path in layer_files(config_dir, fqrn):
        found = read_file(path, variables)
        assignments += found
        variables.update((a.key, a.value) for a in found)
    return config_from(assignments, fqrn)


def site_defaults(config_dir: str) -> ClientConfig:
    """What default.conf, default.d/ and default.local set: CVMFS_REPOSITORIES,
    CVMFS_DEFAULT_DOMAIN, CVMFS_MOUNT_DIR... (@fqrn@ left unexpanded)."""
    return _read_layers(config_dir, None)


def qualified_name(name: str, defaults: ClientConfig) -> str:
    """A bare name (atlas) gets CVMFS_DEFAULT_DOMAIN appended, as cvmfs_mkfqrn does."""
    check_repository_name(name)
    if "." not in name and defaults.default_domain:
        name = f"{name}.{defaults.default_domain}"
    return check_repository_name(name)


def repository_config(config_dir: str, name: str) -> ClientConfig:
    """The effective settings of one repository (a bare name is qualified first)."""
    return _read_layers(config_dir, qualified_name(name, site_defaults(config_dir)))


def configured_repositories(config_dir: str, names: list[str]) -> list[str]:
    """The repositories a command about several means: those named, else
    CVMFS_REPOSITORIES."""
    defaults = site_defaults(config_dir)
    if names:
        return [qualified_name(n, defaults) for n in names]
    if not defaults.repositories:
        raise ConfigError(
            f"no repository named and no CVMFS_REPOSITORIES in {config_dir}/default.local"
        )
    return [qualified_name(n, defaults) for n in defaults.repositories]


def missing_server_url(config: ClientConfig, config_dir: str) -> ConfigError:
    fqrn = config.repository or "the repository"
    domain = fqrn.partition(".")[2]
    return ConfigError(
        f"{fqrn}: no CVMFS_SERVER_URL in {config_dir}: set it in config.d/{fqrn}.conf"
        + (f" or domain.d/{domain}.conf" if domain else "")
    )
