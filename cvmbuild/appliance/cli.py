"""The `cvmbuild export` and `cvmbuild boot` subcommands (wired in by cvmbuild/cli.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from cvmbuild.appliance import FORMATS
from cvmfs_client import console
from cvmfs_client.console import human


def _export(args: argparse.Namespace) -> int:
    from cvmbuild.appliance.export import ExportRequest, export_appliance

    if args.verbose:
        logging.getLogger("cvmbuild.appliance").setLevel(logging.INFO)
    result = export_appliance(
        ExportRequest(
            recipe=Path(args.recipe),
            output=Path(args.output),
            formats=args.format,
            endpoint_url=args.endpoint_url,
            region=args.region,
            keep_work=args.keep_work,
            vboxwrappers=tuple(Path(p) for p in args.vboxwrapper),
        )
    )
    for fmt, paths in result.images.items():
        for path in paths:
            print(f"{fmt:<6} {path}  {human(result.sizes[fmt])}")
    print(f"rootfs content sha256 {result.content_hash}")
    return 0


def _boot(args: argparse.Namespace) -> int:
    from cvmbuild.appliance.boot import BootOptions, boot
    from cvmbuild.appliance.errors import BootError

    result = boot(
        BootOptions(
            image=Path(args.image),
            repo_url=args.repo_url,
            repo_key=Path(args.repo_key) if args.repo_key else None,
            proxy=args.proxy,
            job=args.job,
            timeout=args.timeout,
            memory_mb=args.memory,
            hardware=args.hardware,
            firmware=args.firmware,
            console_log=Path(args.console_log) if args.console_log else None,
            echo=sys.stderr if args.verbose else None,
            repo_name=args.repo_name,
            accel=args.accel,
            cpu=args.cpu,
            cpus=args.cpus,
            forwards=tuple(args.forward),
            seed=Path(args.seed) if args.seed else None,
            cache_disk=Path(args.cache_disk) if args.cache_disk else None,
            cache_size=args.cache_size,
            shell=args.shell,
        )
    )
    if args.shell:
        return result.job_exit or 0
    mounted = ", ".join(f"{name} revision {rev}" for name, rev in result.repositories)
    for line in result.job_output:
        print(f"| {line}")
    if result.no_job:
        print(f"appliance up: mounted {mounted}; no job configured")
        return 0
    print(
        f"appliance up: mounted {mounted} after {result.seconds_to_mount or 0:.1f} s; "
        f"job exit {result.job_exit} after {result.seconds_to_result or 0:.1f} s"
    )
    if result.job_exit != 0:
        raise BootError(f"the appliance came up but its job exited {result.job_exit}")
    return 0


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("export", help="build the thin appliance of a recipe as disk images")
    p.add_argument("--recipe", required=True, help="the appliance recipe, e.g. recipes/thin.toml")
    p.add_argument(
        "--format",
        help=f"comma-separated: {','.join(FORMATS)} (default: the recipe's [appliance] formats)",
    )
    p.add_argument("--output", required=True, help="directory for the images")
    p.add_argument("--endpoint-url", help="ami: the EC2/EBS endpoint (default AWS's)")
    p.add_argument("--region", help="ami: the AWS region (default from the AWS environment)")
    p.add_argument(
        "--vboxwrapper",
        action="append",
        default=[],
        metavar="PATH",
        help="boinc: ship this vboxwrapper binary (BOINC's; Windows, Linux or macOS, "
        "recognised by its header) as the VirtualBox variant's main program; repeatable",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the rootfs and disk parts")
    p.add_argument("-v", "--verbose", action="store_true", help="log every external command")
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_export)

    p = sub.add_parser("boot", help="boot an image under QEMU and check that its job runs")
    p.add_argument("image", help="a raw/qcow2/vdi/vmdk/vhd image, an .ova or an .hdd bundle")
    p.add_argument("--repo-url", "--repo", dest="repo_url", help="repository URL for the guest")
    p.add_argument("--repo-key", help="the repository's public key file, given to the guest")
    p.add_argument(
        "--repo-name",
        help="the repository's name: mounted at /cvmfs/NAME, and its manifest must carry it "
        "(default: the recipe's first repository)",
    )
    p.add_argument(
        "--seed",
        help="a cloud-init seed image to attach instead of --repo-*/--job: NoCloud "
        "(label cidata, e.g. from cloud-localds) or ConfigDrive (label config-2)",
    )
    p.add_argument("--proxy", help="HTTP proxies for the guest, CernVM-FS syntax")
    p.add_argument("--job", help="the command the appliance runs (default: the recipe's)")
    p.add_argument("--timeout", type=float, default=300, help="seconds (default 300)")
    p.add_argument("--memory", type=int, default=512, help="MiB of guest memory (default 512)")
    p.add_argument(
        "--hardware",
        default="virtio",
        choices=["virtio", "sata", "ide"],
        help="disk bus and NIC: virtio (KVM), sata+e1000 (VirtualBox), ide+e1000 (VMware)",
    )
    p.add_argument(
        "--firmware", default="bios", choices=["bios", "uefi"], help="uefi boots with OVMF"
    )
    p.add_argument(
        "--accel",
        default="auto",
        choices=["auto", "kvm", "tcg"],
        help="auto (default): KVM when /dev/kvm works, else software emulation (TCG)",
    )
    p.add_argument("--cpu", help="QEMU CPU model (default: max under TCG, host under KVM)")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1)")
    p.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="forward TCP port HOST on 127.0.0.1 to port GUEST of the appliance; repeatable",
    )
    p.add_argument(
        "--cache-disk",
        metavar="FILE",
        help="a persistent cache disk (qcow2, made if missing): the appliance formats it on "
        "first boot and keeps the repository cache there, so the next boot starts warm",
    )
    p.add_argument("--cache-size", default="2G", help="size of a new cache disk (default 2G)")
    p.add_argument(
        "--shell",
        action="store_true",
        help="attach the serial console to this terminal; after its job (or an error) the "
        "appliance opens a shell there, and powers off when it exits (Ctrl-a x quits QEMU)",
    )
    p.add_argument("--console-log", help="write the serial console to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="show the serial console")
    console.add_debug(p, subcommand=True)
    p.set_defaults(func=_boot)
