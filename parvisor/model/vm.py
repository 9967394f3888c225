"""The VM definition: what a VM *is*, independent of whether it runs.

Versioned (``schema_version``); ``upgrade_definition`` lifts stored older versions.
Validation here is the single edge check: every layer (API, CLI, store, importers)
builds definitions through ``VmDefinition.model_validate`` and gets the same messages.
Runtime facts (state, pid, heartbeat) are *not* here; see ``VmStatus``.
"""

from __future__ import annotations

import enum
import re
import uuid as uuid_mod
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parvisor.model.sizes import parse_size
from parvisor.model.states import VmState

DEFINITION_VERSION = 6
MAX_VCPUS = 64                 # q35 + our argv; later issues may raise it
MIN_MEMORY = 32 << 20          # below this no Linux kernel gets to userspace
MAX_MEMORY = 1 << 40
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_VCPU_HEADROOM = 4      # max_vcpus defaults to max(vcpus, 4): hot-add room
MemoryHotplug = Literal["virtio-mem", "dimm"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-63 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit")
    return value


class AutoStartAction(str, enum.Enum):
    NOTHING = "nothing"
    START_IF_RUNNING = "start-if-running"
    ALWAYS_START = "always-start"


class AutoStopAction(str, enum.Enum):
    SAVE = "save"
    SHUTDOWN = "shutdown"
    TURN_OFF = "turn-off"


class KernelBoot(Strict):
    kind: Literal["kernel"] = "kernel"
    kernel: str
    initrd: str | None = None
    cmdline: str = ""


class DiskBoot(Strict):
    kind: Literal["disk"] = "disk"


Boot = Annotated[KernelBoot | DiskBoot, Field(discriminator="kind")]


class DiskSpec(Strict):
    """A disk or an optical drive. ``media="cdrom"`` with ``path=None`` is an empty drive."""

    id: str
    path: str | None
    format: Literal["qcow2", "raw"] = "qcow2"
    bus: Literal["virtio-blk", "virtio-scsi", "ide", "ahci"] = "virtio-blk"
    media: Literal["disk", "cdrom"] = "disk"
    readonly: bool = False
    # True: parvisor created this file for this VM (vm create --disk-size) and deletes it
    # with the VM; user-supplied disks and shared bases are never deleted.
    owned: bool = False
    # A guest-cluster disk: several VMs write it at once (scsi-hd share-rw=on, no host
    # cache). Never owned: it outlives every VM that uses it (docs/cluster.md).
    shared: bool = False

    @model_validator(mode="after")
    def _media(self) -> "DiskSpec":
        if self.shared:
            _check_shared(self)
        if self.media == "disk" and not self.path:
            raise ValueError(f"disk {self.id}: a disk needs a path")
        if self.media == "disk" and self.readonly and self.bus in ("ide", "ahci"):
            raise ValueError(f"disk {self.id}: read-only disks need the virtio-blk or "
                             "virtio-scsi bus (QEMU's IDE disks cannot be read-only)")
        if self.media == "cdrom" and self.bus not in ("ide", "ahci", "virtio-scsi"):
            raise ValueError(f"disk {self.id}: a CD/DVD drive sits on ide, ahci or "
                             "virtio-scsi")
        return self


def _check_shared(disk: DiskSpec) -> None:
    """What a disk written by several QEMUs at once must be; anything else corrupts it."""
    if disk.media != "disk":
        raise ValueError(f"disk {disk.id}: only disks can be shared, not CD/DVD drives")
    if disk.format != "raw":
        raise ValueError(f"disk {disk.id}: a shared disk must be raw: qcow2 metadata "
                         "(allocation tables, refcounts) cannot be written by two QEMUs at "
                         "once (convert with 'parvisor disk convert --format raw')")
    if disk.bus != "virtio-scsi":
        raise ValueError(f"disk {disk.id}: a shared disk sits on the virtio-scsi bus "
                         "(scsi-hd with shared write access)")
    if disk.readonly:
        raise ValueError(f"disk {disk.id}: a shared disk is written by its VMs; a "
                         "read-only disk needs no sharing (leave out --shared)")
    if disk.owned:
        raise ValueError(f"disk {disk.id}: a shared disk belongs to no single VM")


class NicSpec(Strict):
    id: str
    switch: str
    mac: str
    model: Literal["virtio", "e1000"] = "virtio"
    vlan: int | None = Field(default=None, ge=1, le=4094)


class DynamicMemory(Strict):
    """Hyper-V's Dynamic Memory: a balloon moves the guest between min and max
    (``parvisor.ops.dynamic_memory``); ``memory_bytes`` is the startup amount."""

    min_bytes: int = Field(ge=MIN_MEMORY, le=MAX_MEMORY)
    max_bytes: int = Field(ge=MIN_MEMORY, le=MAX_MEMORY)
    buffer_pct: int = Field(default=20, ge=5, le=200)   # spare memory kept above use

    @model_validator(mode="after")
    def _bounds(self) -> "DynamicMemory":
        if self.min_bytes > self.max_bytes:
            raise ValueError("dynamic memory: min exceeds max")
        if self.min_bytes % (1 << 20) or self.max_bytes % (1 << 20):
            raise ValueError("dynamic memory: min and max must be whole MiB")
        return self


class ResourceControls(Strict):
    """Hyper-V's relative weight / limit, for the QEMU process (cgroups) and its disks
    (QEMU I/O throttling). 0 means no limit."""

    cpu_weight: int = Field(default=100, ge=1, le=10000)     # relative; 100 = normal
    cpu_limit_pct: int = Field(default=0, ge=0, le=100)      # % of the VM's vCPUs
    disk_iops_limit: int = Field(default=0, ge=0, le=10_000_000)
    disk_bandwidth_bytes: int = Field(default=0, ge=0, le=1 << 40)   # per second

    @property
    def any_cpu(self) -> bool:
        return self.cpu_weight != 100 or self.cpu_limit_pct > 0

    @property
    def any_disk(self) -> bool:
        return self.disk_iops_limit > 0 or self.disk_bandwidth_bytes > 0


class VmDefinition(Strict):
    schema_version: int = DEFINITION_VERSION
    name: str
    uuid: str = Field(default_factory=lambda: str(uuid_mod.uuid4()))
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    max_vcpus: int = Field(default=0, ge=0, le=MAX_VCPUS)     # 0: derived in validator
    memory_bytes: int = Field(default=256 << 20, ge=MIN_MEMORY, le=MAX_MEMORY)
    max_memory_bytes: int = Field(default=0, ge=0, le=MAX_MEMORY)  # 0: same as memory
    boot: Boot
    # How memory changes while running: virtio-mem (grows and shrinks in blocks; Linux
    # 5.8+) or pc-dimm slots (grow only without guest help). Default: see _defaults.
    memory_hotplug: MemoryHotplug = "virtio-mem"
    dynamic_memory: DynamicMemory | None = None
    resources: ResourceControls = ResourceControls()
    generation: Literal[1, 2] = 1          # 1: BIOS (SeaBIOS), 2: UEFI (OVMF)
    secure_boot: bool = False              # generation 2 only
    tpm: bool = False                      # a virtual TPM (swtpm)
    os_type: Literal["linux", "windows", "other"] = "linux"
    boot_order: tuple[str, ...] = ()       # device ids; empty: disks in order
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    ha: bool = False
    # failover cluster policy (parvisor.cluster): restart order, hard anti-affinity
    # group, hosts to try first
    ha_priority: Literal["high", "medium", "low", "none"] = "medium"
    anti_affinity: str | None = None
    preferred_hosts: tuple[str, ...] = ()
    auto_start_action: AutoStartAction = AutoStartAction.START_IF_RUNNING
    auto_start_delay_s: int = Field(default=0, ge=0, le=3600)
    auto_stop_action: AutoStopAction = AutoStopAction.SAVE
    notes: str = Field(default="", max_length=4096)
    # A template's disks are the read-only parents of linked clones (vm clone --linked):
    # it must not start or write while they depend on it (parvisor.ops.clones).
    template: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("anti_affinity")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return validate_name(value, "anti-affinity group") if value else None

    @field_validator("preferred_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(validate_name(host, "host name") for host in value)

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return str(uuid_mod.UUID(value))

    @field_validator("memory_bytes", "max_memory_bytes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        return parse_size(value, what="memory") if isinstance(value, str) else value

    @field_validator("notes")
    @classmethod
    def _notes(cls, value: str) -> str:
        if any(ord(c) < 32 and c not in "\n\t" for c in value):
            raise ValueError("notes must not contain control characters")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            vcpus = data.get("vcpus", 1)
            if not data.get("max_vcpus") and isinstance(vcpus, int):
                data["max_vcpus"] = min(MAX_VCPUS, max(vcpus, DEFAULT_VCPU_HEADROOM))
            memory = data.get("memory_bytes", 256 << 20)
            if isinstance(memory, str):
                memory = data["memory_bytes"] = parse_size(memory, what="memory")
            if not data.get("max_memory_bytes"):
                data["max_memory_bytes"] = memory
            if "memory_hotplug" not in data:   # virtio-mem needs a Linux driver
                data["memory_hotplug"] = ("virtio-mem" if data.get("os_type", "linux")
                                          == "linux" else "dimm")
        return data

    @model_validator(mode="after")
    def _limits(self) -> "VmDefinition":
        if self.max_vcpus and self.vcpus > self.max_vcpus:
            raise ValueError(f"vcpus ({self.vcpus}) exceeds max_vcpus ({self.max_vcpus})")
        if self.max_memory_bytes and self.memory_bytes > self.max_memory_bytes:
            raise ValueError("memory exceeds max memory")
        if self.memory_bytes % (1 << 20):
            raise ValueError("memory must be a whole number of MiB")
        if self.max_memory_bytes % (1 << 20):
            raise ValueError("max memory must be a whole number of MiB")
        ids = [d.id for d in self.disks] + [n.id for n in self.nics]
        if len(ids) != len(set(ids)):
            raise ValueError("device ids must be unique within a VM")
        unknown = set(self.boot_order) - set(ids)
        if unknown:
            raise ValueError(f"boot_order names unknown devices: {sorted(unknown)}")
        if self.secure_boot and self.generation != 2:
            raise ValueError("secure boot needs a generation 2 (UEFI) VM")
        dyn = self.dynamic_memory
        if dyn and not dyn.min_bytes <= self.memory_bytes <= dyn.max_bytes:
            raise ValueError("with dynamic memory, memory (the startup amount) must lie "
                             "between its min and max")
        return self


class VmStatus(BaseModel):
    """What the API returns for a VM: definition + runtime facts (the JSON contract)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    uuid: str
    state: VmState
    state_reason: str = ""
    host: str
    vcpus: int
    max_vcpus: int
    memory_bytes: int
    max_memory_bytes: int
    memory_hotplug: str = "virtio-mem"
    dynamic_memory: DynamicMemory | None = None
    resources: ResourceControls = ResourceControls()
    # Runtime memory while QEMU runs: what the guest has now (balloon / virtio-mem).
    memory_current_bytes: int | None = None
    boot: Boot
    generation: int = 1
    secure_boot: bool = False
    tpm: bool = False
    os_type: str = "linux"
    boot_order: list[str] = []
    disks: list[dict[str, Any]]
    nics: list[dict[str, Any]]
    ha: bool
    ha_priority: str = "medium"
    anti_affinity: str | None = None
    preferred_hosts: list[str] = []
    ha_status: str = ""         # cluster: protected / not protected / error, with why
    migration: str = ""         # cluster: a live migration in flight ("h1 -> h2, performing")
    replication: str = ""       # cluster: "sync h1 -> h2, in-sync (generation 1)"; "" none
    auto_start_action: AutoStartAction
    auto_start_delay_s: int
    auto_stop_action: AutoStopAction
    notes: str
    heartbeat: Literal["ok", "lost", "no-agent", "unknown"] = "unknown"
    ip_addresses: list[str] = []
    os_info: dict[str, Any] | None = None
    accelerator: Literal["kvm", "tcg"]
    pid: int | None = None
    uptime_s: float | None = None
    revision: int = 0            # bumps on every stored change (optimistic concurrency)
    template: bool = False       # parent of linked clones: cannot start (ops.clones)


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v2 added generation, secure_boot, tpm, os_type, boot_order and disk media; their
    # defaults describe every v1 VM exactly.
    return {**data, "schema_version": 2}


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    # v3 added memory_hotplug, dynamic_memory and resources. A v2 VM's QEMU (maybe
    # still running, re-adopted) laid memory out in pc-dimm slots: say so exactly.
    return {**data, "memory_hotplug": data.get("memory_hotplug", "dimm"),
            "schema_version": 3}


def _v3_to_v4(data: dict[str, Any]) -> dict[str, Any]:
    # v4 added template (linked clones); no v3 VM was one.
    return {**data, "template": False, "schema_version": 4}


def _v4_to_v5(data: dict[str, Any]) -> dict[str, Any]:
    # v5 added the cluster HA policy; the defaults are what the cluster assumed before.
    return {**data, "ha_priority": "medium", "anti_affinity": None,
            "preferred_hosts": [], "schema_version": 5}


def _v5_to_v6(data: dict[str, Any]) -> dict[str, Any]:
    # v6 added shared disks (guest clustering); no v5 disk was one. The version moves so
    # that an older parvisor refuses a v6 VM instead of starting it without share-rw.
    return {**data, "schema_version": 6}


_UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5, 5: _v5_to_v6}


def upgrade_definition(data: dict[str, Any]) -> dict[str, Any]:
    """Lift a stored definition to the current version, one step at a time."""
    version = data.get("schema_version", 1)
    if version > DEFINITION_VERSION:
        raise ValueError(f"definition version {version} is newer than this parvisor")
    while version < DEFINITION_VERSION:
        data = _UPGRADES[version](data)
        version = data["schema_version"]
    return data
