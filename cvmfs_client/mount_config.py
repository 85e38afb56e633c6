"""From settings (a site's configuration directory, a --config file, the command line)
to the options of one mount: URL, master key, cache, quota, timeouts and logging.
What the command line gives wins over the files."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from cvmfs_client import network
from cvmfs_client.config import ClientConfig, ConfigError
from cvmfs_client.errors import ClientError
from cvmfs_client.fetch_pool import WORKERS as FETCH_WORKERS
from cvmfs_client.fetcher import fetcher_for
from cvmfs_client.mount import MountOptions, default_cache_dir
from cvmfs_client.site_config import missing_server_url
from cvmfs_client.trust_store import choose_key
from cvmfs_format.trust import PUBLIC_KEY_SUFFIX, pinned_name


@dataclass(frozen=True)
class Given:
    """What the command line says; None: the configuration's value."""

    url: str | None = None
    key: str | None = None
    cache_dir: str | None = None
    quota: int | None = None
    proxy: str | None = None
    tag: str | None = None
    revision: int | None = None
    max_ttl: float | None = None
    foreground: bool = False
    prefetch: bool = True
    fetch_workers: int = FETCH_WORKERS
    ca_bundle: str | None = None
    trace: str | None = None


def key_candidates(config: ClientConfig, config_dir: str | None) -> list[str]:
    """CernVM-FS's order: CVMFS_PUBLIC_KEY's files, else every *.pub in CVMFS_KEYS_DIR,
    else in the configuration directory's keys/."""
    if config.public_keys:
        return list(config.public_keys)
    directory = config.keys_dir or (os.path.join(config_dir, "keys") if config_dir else None)
    if directory is None:
        return []
    return sorted(glob.glob(os.path.join(glob.escape(directory), "*" + PUBLIC_KEY_SUFFIX)))


def mount_options(
    config: ClientConfig,
    mountpoint: str,
    given: Given,
    *,
    name: str | None = None,
    config_dir: str | None = None,
) -> MountOptions:
    """The options of a mount of repository `name` (None: the key file's NAME.pub) with
    `config` read from config_dir (None: from a single --config file, or nothing)."""
    url = given.url or config.server_url
    if not url:
        if config_dir is not None:
            raise missing_server_url(config, config_dir)
        raise ClientError("no repository URL: give one or set CVMFS_SERVER_URL in --config")
    if "@fqrn@" in url or "@org@" in url:
        raise ConfigError(
            f"{config.origin('CVMFS_SERVER_URL')}: CVMFS_SERVER_URL uses @fqrn@ or @org@: "
            "give the repository's name (cvmfs-client mount REPO_NAME MOUNTPOINT)"
        )
    proxies = given.proxy or config.http_proxy or ""
    ca_bundle = network.ca_bundle(given.ca_bundle or config.ca_bundle)
    key = given.key
    if key is None:
        candidates = key_candidates(config, config_dir)
        if not candidates:
            where = f"in {config_dir}/keys" if config_dir else "in --config"
            raise ClientError(
                f"no public key: give --key or set CVMFS_PUBLIC_KEY or CVMFS_KEYS_DIR {where}"
            )
        if name is None and len(candidates) > 1:
            raise ClientError(
                f"{len(candidates)} public keys configured: give the repository's name"
            )
        key = choose_key(candidates, name or "", fetcher_for(url, proxies, ca_bundle))
    name = pinned_name(key, name)
    pinned = given.tag is not None or given.revision is not None
    return MountOptions(
        url=url,
        mountpoint=mountpoint,
        key_file=key,
        cache_dir=os.path.abspath(given.cache_dir or default_cache_dir(name, config.cache_base)),
        foreground=given.foreground,
        quota=given.quota if given.quota is not None else config.quota_bytes,
        proxies=proxies,
        tag=given.tag if pinned else config.tag,
        revision=given.revision if pinned else config.revision,
        max_ttl=given.max_ttl if given.max_ttl is not None else config.max_ttl_s,
        prefetch=given.prefetch,
        fetch_workers=given.fetch_workers,
        name=name,
        kcache_timeout=config.kcache_timeout_s,
        log=config.log,
        ca_bundle=ca_bundle,
        trace=os.path.abspath(given.trace) if given.trace else None,
    )
