"""Validated requests: what a client may ask for, checked at the edge.

Unknown fields are refused (``extra="forbid"``) so a typo never silently does nothing.
Sizes accept ``256M``/``1G``/``1GiB`` or a byte count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parvisor.model.sizes import parse_size
from parvisor.model.vm import MAX_VCPUS, AutoStartAction, AutoStopAction, validate_name
from parvisor.ops.disk_requests import MAX_DISKS_PER_VM, PATH_MAX, AttachDisk, NewDisk


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _size(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return parse_size(value, what=what)
    raise ValueError(f"{what} must be a size like 256M or a number of bytes")


class NicRequest(Request):
    """One network adapter: ``SWITCH[,vlan=N][,mac=M][,model=virtio|e1000]`` on the CLI."""

    switch: str = Field(min_length=1, max_length=32)
    vlan: int | None = Field(default=None, ge=1, le=4094)
    mac: str | None = Field(default=None, max_length=32)
    model: Literal["virtio", "e1000"] = "virtio"


class CreateVm(Request):
    name: str
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    max_vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    memory: int | str = "256M"
    max_memory: int | str | None = None
    image: Literal["tiny"] | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = Field(default=None, max_length=4096)
    disk: str | None = None          # the old single boot disk; same as disks=[{path}]
    disks: list[AttachDisk] = Field(default_factory=list, max_length=MAX_DISKS_PER_VM)
    new_disks: list[NewDisk] = Field(default_factory=list, max_length=MAX_DISKS_PER_VM)
    cdrom: str | None = Field(default=None, min_length=1, max_length=PATH_MAX)
    boot_order: list[str] | None = Field(default=None, max_length=MAX_DISKS_PER_VM)
    nics: list[NicRequest] = Field(default_factory=list, max_length=8)
    # Firmware and guest OS (parvisor.vm.firmware); boot="disk" with image="tiny" boots
    # a differencing child of the tiny guest's disk instead of its kernel.
    generation: Literal[1, 2] = 1
    secure_boot: bool = False
    tpm: bool = False
    os_type: Literal["linux", "windows", "other"] = "linux"
    boot: Literal["kernel", "disk"] | None = None
    # cloud-init NoCloud seed: the *contents* of the user-data file and of SSH public keys
    cloud_init_user_data: str | None = Field(default=None, max_length=1 << 20)
    ssh_keys: list[str] = Field(default_factory=list, max_length=32)
    ha: bool = False
    # cluster HA policy (validated by VmDefinition)
    ha_priority: Literal["high", "medium", "low", "none"] = "medium"
    anti_affinity: str | None = None
    preferred_hosts: list[str] = Field(default_factory=list, max_length=16)
    auto_start_action: AutoStartAction = AutoStartAction.START_IF_RUNNING
    auto_start_delay_s: int = Field(default=0, ge=0, le=3600)
    auto_stop_action: AutoStopAction = AutoStopAction.SAVE
    notes: str = Field(default="", max_length=4096)

    _name = field_validator("name")(lambda cls, v: validate_name(v))

    @field_validator("memory", "max_memory", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int | None:
        return _size(value, "memory")


class DynamicMemoryRequest(Request):
    """``enabled=false`` turns dynamic memory off; sizes as for memory."""

    enabled: bool = True
    min: int | str | None = None
    max: int | str | None = None
    buffer_pct: int | None = Field(default=None, ge=5, le=200)

    @field_validator("min", "max", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int | None:
        return _size(value, "memory")


class ResourcesRequest(Request):
    """Only the given fields change; 0 removes a limit (weight: 100 is normal)."""

    cpu_weight: int | None = Field(default=None, ge=1, le=10000)
    cpu_limit_pct: int | None = Field(default=None, ge=0, le=100)
    disk_iops_limit: int | None = Field(default=None, ge=0, le=10_000_000)
    disk_bandwidth_limit: int | str | None = None     # bytes per second, e.g. 10M

    @field_validator("disk_bandwidth_limit", mode="before")
    @classmethod
    def _rate(cls, value: object) -> int | None:
        if value in (0, "0"):
            return 0
        return _size(value, "disk bandwidth limit")


class EditVm(Request):
    vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    max_vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    memory: int | str | None = None
    max_memory: int | str | None = None
    notes: str | None = Field(default=None, max_length=4096)
    ha: bool | None = None
    ha_priority: Literal["high", "medium", "low", "none"] | None = None
    anti_affinity: str | None = None        # "" clears the group
    preferred_hosts: list[str] | None = Field(default=None, max_length=16)
    auto_start_action: AutoStartAction | None = None
    auto_start_delay_s: int | None = Field(default=None, ge=0, le=3600)
    auto_stop_action: AutoStopAction | None = None
    cmdline: str | None = Field(default=None, max_length=4096)
    boot_order: list[str] | None = Field(default=None, max_length=MAX_DISKS_PER_VM)
    # hot-add (parvisor.ops.hotplug): on a running VM only vcpus, memory, dynamic-memory
    # bounds, resources and the plain metadata fields may change
    memory_hotplug: Literal["virtio-mem", "dimm"] | None = None
    dynamic_memory: DynamicMemoryRequest | None = None
    resources: ResourcesRequest | None = None

    @field_validator("memory", "max_memory", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int | None:
        return _size(value, "memory")


class AddNic(NicRequest):
    """``vm nic add``: a NIC request as for ``vm create --nic``."""


class AddDisk(Request):
    """``vm disk add``: a new empty disk (``size``, owned by the VM) or an existing
    image (``path``, in a storage root)."""

    size: int | str | None = None
    path: str | None = Field(default=None, min_length=1, max_length=PATH_MAX)
    bus: Literal["virtio-blk", "virtio-scsi"] = "virtio-blk"
    format: Literal["qcow2", "raw"] | None = None
    readonly: bool = False
    shared: bool = False        # guest clustering: several VMs write it (raw, virtio-scsi)

    @field_validator("size", mode="before")
    @classmethod
    def _size_field(cls, value: object) -> int | None:
        return _size(value, "disk size")


class ShutdownVm(Request):
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


class DeleteVm(Request):
    force: bool = False


class ExecInGuest(Request):
    argv: list[str] = Field(min_length=1, max_length=256)
    input: str | None = Field(default=None, max_length=1 << 20)
    timeout_s: float = Field(default=60, gt=0, le=3600)


class BuildImage(Request):
    force: bool = False
