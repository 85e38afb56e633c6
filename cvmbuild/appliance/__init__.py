"""The thin appliance: recipes, rootfs, kernel and initramfs, disk image, exporters, boot.

`build.build_disk` turns a recipe into a bootable raw disk; `exporters` turn that disk
into the formats hypervisors and clouds import; `boot` tries an image under QEMU.
"""

# Every image format `cvmbuild export` writes (cvmbuild/appliance/exporters/).
FORMATS = ("raw", "qcow2", "vdi", "vmdk", "ova", "hdd", "vhd", "ami", "boinc")
