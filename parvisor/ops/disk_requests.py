"""Validated requests about disks: the ``disk …`` commands and the disk options of
``vm create`` (existing disks, new empty disks, a CD/DVD drive).

Only shape and range checks live here; anything that needs the file system (roots,
chains, existing files) is checked by ``parvisor.ops.disks``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parvisor.model.sizes import parse_size

Bus = Literal["virtio-blk", "virtio-scsi", "ide", "ahci"]
CdromBus = Literal["ide", "ahci", "virtio-scsi"]
VmDiskFormat = Literal["qcow2", "raw"]
InputFormat = Literal["qcow2", "raw", "vpc", "vhdx", "vmdk"]
MAX_DISKS_PER_VM = 32
PATH_MAX = 4096


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _disk_size(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        size = parse_size(value, what="disk size")
        if size <= 0:
            raise ValueError("disk size must be positive")
        return size
    raise ValueError("disk size must be a size like 10G or a number of bytes")


class AttachDisk(_Request):
    """An existing image (inside the storage roots) given to a new VM."""

    path: str = Field(min_length=1, max_length=PATH_MAX)
    bus: Bus = "virtio-blk"
    format: VmDiskFormat | None = None      # None: from the extension / qemu-img
    readonly: bool = False
    shared: bool = False    # guest clustering: written by several VMs (raw, virtio-scsi)


class NewDisk(_Request):
    """An empty disk parvisor creates for a new VM (and deletes with it)."""

    size: int | str
    bus: Bus = "virtio-blk"
    format: VmDiskFormat = "qcow2"

    _size = field_validator("size", mode="before")(lambda cls, v: _disk_size(v))


class CreateDisk(_Request):
    path: str = Field(min_length=1, max_length=PATH_MAX)
    size: int | str | None = None           # None with a parent: the parent's size
    format: VmDiskFormat = "qcow2"
    parent: str | None = Field(default=None, min_length=1, max_length=PATH_MAX)

    _size = field_validator("size", mode="before")(lambda cls, v: _disk_size(v))


class ResizeDisk(_Request):
    path: str = Field(min_length=1, max_length=PATH_MAX)
    size: int | str

    _size = field_validator("size", mode="before")(lambda cls, v: _disk_size(v))


class ConvertDisk(_Request):
    source: str = Field(min_length=1, max_length=PATH_MAX)
    target: str = Field(min_length=1, max_length=PATH_MAX)
    source_format: InputFormat | None = None   # None: qemu-img detects (source only read)
    format: VmDiskFormat = "qcow2"


class DiskPath(_Request):
    path: str = Field(min_length=1, max_length=PATH_MAX)


class InsertCdrom(_Request):
    path: str = Field(min_length=1, max_length=PATH_MAX)
    drive: str | None = None                 # device id; None: the VM's first CD drive
