"""ami for EC2: the raw disk uploaded as an EBS snapshot through the EBS direct API
(start_snapshot, put_snapshot_block in 512 KiB blocks with SHA-256 checksums,
complete_snapshot; all-zero blocks are skipped) and registered as an HVM image.

This is the path AWS's coldsnap takes; it needs no S3 bucket. `--endpoint-url` points
both clients elsewhere (a moto server in the tests); credentials and region come from
the usual AWS environment.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cvmbuild.appliance.errors import ApplianceError
from cvmbuild.appliance.exporters import ExportContext

BLOCK = 512 * 1024  # the EBS direct API's block size
GiB = 1024**3


def blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(index, data) of every block that is not all zeros; the last one zero-padded."""
    zero = bytes(BLOCK)
    with open(path, "rb") as f:
        index = 0
        while chunk := f.read(BLOCK):
            chunk = chunk.ljust(BLOCK, b"\0")
            if chunk != zero:
                yield index, chunk
            index += 1


def linear_checksum(digests: list[bytes]) -> str:
    """EBS's LINEAR aggregation: SHA-256 over the blocks' SHA-256 digests in order."""
    return base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()


def _clients(context: ExportContext) -> tuple[Any, Any]:
    try:
        import boto3
    except ImportError as exc:
        raise ApplianceError("the ami format needs boto3: `pip install boto3`") from exc
    kwargs = {"endpoint_url": context.endpoint_url, "region_name": context.region}
    kwargs = {k: v for k, v in kwargs.items() if v}
    return boto3.client("ebs", **kwargs), boto3.client("ec2", **kwargs)


def export(context: ExportContext) -> list[Path]:
    from botocore.exceptions import BotoCoreError, ClientError

    ebs, ec2 = _clients(context)
    size = context.disk.stat().st_size
    name = f"{context.name}-{context.content_hash[:12]}"
    try:
        snapshot = ebs.start_snapshot(
            VolumeSize=max(1, -(-size // GiB)),
            Description=f"{context.name} appliance root disk",
            Tags=[{"Key": "Name", "Value": name}],
        )["SnapshotId"]

        def put(item: tuple[int, bytes]) -> tuple[int, bytes]:
            index, data = item
            digest = hashlib.sha256(data).digest()
            ebs.put_snapshot_block(
                SnapshotId=snapshot, BlockIndex=index, BlockData=data, DataLength=BLOCK,
                Checksum=base64.b64encode(digest).decode(), ChecksumAlgorithm="SHA256",
            )  # fmt: skip
            return index, digest

        with ThreadPoolExecutor(max_workers=8) as pool:
            done = sorted(pool.map(put, blocks(context.disk)))
        ebs.complete_snapshot(
            SnapshotId=snapshot, ChangedBlocksCount=len(done),
            Checksum=linear_checksum([d for _, d in done]),
            ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR",
        )  # fmt: skip
        image = ec2.register_image(
            Name=name,
            Description=f"{context.name}: thin appliance built by cvmbuild",
            Architecture="x86_64",
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[
                {
                    "DeviceName": "/dev/xvda",
                    "Ebs": {
                        "SnapshotId": snapshot,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ],
            VirtualizationType="hvm",
            EnaSupport=True,
            BootMode="legacy-bios",
        )["ImageId"]
    except (BotoCoreError, ClientError) as exc:
        raise ApplianceError(f"ami upload failed: {exc}") from exc
    target = context.output / f"{context.name}.ami.json"
    target.write_text(
        json.dumps(
            {
                "image_id": image,
                "snapshot_id": snapshot,
                "name": name,
                "blocks_uploaded": len(done),
                "region": ec2.meta.region_name,
                "endpoint_url": context.endpoint_url,
            },
            indent=2,
        )
        + "\n"
    )
    return [target]
