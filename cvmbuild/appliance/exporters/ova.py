"""ova for VirtualBox and VMware import: a tar of the OVF descriptor, its manifest
(SHA-256 of each file) and a streamOptimized vmdk, in that order (OVF 1.0: descriptor
first, manifest next, then the files in the order of References)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

from cvmbuild.appliance.exporters import ExportContext
from cvmbuild.appliance.exporters.qemu_img import convert, info

VMDK_STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
DEBIAN_64 = 96  # CIM operating system id, "Debian 64-Bit"


def ovf_descriptor(
    name: str, disk_file: str, file_size: int, capacity: int, memory_mb: int, cpus: int
) -> str:
    """The OVF 1.0 envelope: one VM with an IDE (PIIX4) disk and an E1000 NIC on NAT,
    which both VirtualBox and VMware map onto their own hardware."""
    n = escape(name)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US"
    xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:id="file1" ovf:href="{escape(disk_file)}" ovf:size="{file_size}"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1"
        ovf:fileRef="file1" ovf:format="{VMDK_STREAM}"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>The network the appliance reaches its repository through</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{n}">
    <Info>A thin appliance that mounts its software repository at boot</Info>
    <Name>{n}</Name>
    <OperatingSystemSection ovf:id="{DEBIAN_64}">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{n}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-10</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory size</rasd:Description>
        <rasd:ElementName>{memory_mb} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory_mb}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>ethernet0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def manifest(files: dict[str, bytes | Path]) -> str:
    lines = []
    for name, content in files.items():
        if isinstance(content, Path):
            with open(content, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        else:
            digest = hashlib.sha256(content).hexdigest()
        lines.append(f"SHA256({name})= {digest}\n")
    return "".join(lines)


def export(context: ExportContext) -> list[Path]:
    name = context.name
    disk_name = f"{name}-disk1.vmdk"
    vmdk = convert(
        context.disk, context.output / f".{disk_name}.tmp", "vmdk",
        "subformat=streamOptimized,adapter_type=ide",
    )  # fmt: skip
    capacity = int(info(vmdk, "vmdk")["virtual-size"])
    ovf = ovf_descriptor(
        name, disk_name, vmdk.stat().st_size, capacity,
        context.recipe.vm.memory_mb, context.recipe.vm.cpus,
    ).encode()  # fmt: skip
    mf = manifest({f"{name}.ovf": ovf, disk_name: vmdk}).encode()
    target = context.output / f"{name}.ova"
    with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, content in ((f"{name}.ovf", ovf), (f"{name}.mf", mf), (disk_name, vmdk)):
            entry = tarfile.TarInfo(member)
            entry.mtime, entry.mode, entry.uname, entry.gname = context.epoch, 0o644, "", ""
            if isinstance(content, Path):
                entry.size = content.stat().st_size
                with open(content, "rb") as f:
                    tar.addfile(entry, f)
            else:
                entry.size = len(content)
                tar.addfile(entry, io.BytesIO(content))
    vmdk.unlink()
    return [target]
