"""Pure decisions of hot-add / hot-remove: which CPU slots, which root port, how much
virtio-mem, which memory DIMMs, which throttle values.

Inputs are QEMU's own answers (``query-hotpluggable-cpus``, ``query-pci``,
``query-memory-devices``) parsed into small typed records, so the running QEMU is the
truth also after a service restart (nothing here is remembered between calls).
This module must never speak QMP, touch files or change the store: it only decides,
and refuses impossible requests with ``InvalidInput`` before anything is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from parvisor.errors import InvalidInput
from parvisor.model.sizes import format_size
from parvisor.model.vm import ResourceControls
from parvisor.vm.argv import HOTPLUG_PORT_PREFIX, MEMORY_HOTPLUG_SLOTS

DIMM_ALIGN = 128 << 20          # Linux onlines memory in 128 MiB blocks on x86_64
DIMM_PREFIX = "dimm"


# --- processors -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuSlot:
    """One entry of ``query-hotpluggable-cpus``: plugged when ``qom_path`` is set."""

    type: str
    props: tuple[tuple[str, int], ...]
    qom_path: str | None

    @classmethod
    def from_reply(cls, item: Mapping[str, Any]) -> "CpuSlot":
        return cls(type=str(item["type"]), props=tuple(sorted(item["props"].items())),
                   qom_path=item.get("qom-path"))

    @property
    def order(self) -> tuple[int, ...]:
        p = dict(self.props)
        return (p.get("socket-id", 0), p.get("core-id", 0), p.get("thread-id", 0))

    @property
    def device_id(self) -> str:
        socket, core, thread = self.order
        return f"vcpu-s{socket}c{core}t{thread}"


@dataclass(frozen=True)
class CpuPlan:
    add: tuple[CpuSlot, ...] = ()
    remove: tuple[CpuSlot, ...] = ()


def parse_cpu_slots(reply: Iterable[Mapping[str, Any]]) -> list[CpuSlot]:
    return sorted((CpuSlot.from_reply(item) for item in reply), key=lambda s: s.order)


TCG_REMOVE_REFUSAL = (
    "removing vCPUs from a running VM is refused under TCG: QEMU 7.2 aborts ('corrupted "
    "double-linked list') at the next device change after a TCG vCPU was unplugged; "
    "lower --cpus while the VM is off (with KVM it works live)")


def cpu_plan(slots: list[CpuSlot], target: int, *, allow_remove: bool = True) -> CpuPlan:
    """Fill the lowest free slots to grow; free the highest plugged ones to shrink.
    The first CPU (the bootstrap processor) is never removed."""
    plugged = [s for s in slots if s.qom_path]
    free = [s for s in slots if not s.qom_path]
    if target < 1:
        raise InvalidInput("a VM keeps at least one vCPU", vcpus=target)
    if target > len(slots):
        raise InvalidInput(f"{target} vCPUs exceed this VM's maximum of {len(slots)} (set "
                           "at start; change --max-cpus while it is off)",
                           vcpus=target, max_vcpus=len(slots))
    if target >= len(plugged):
        return CpuPlan(add=tuple(free[:target - len(plugged)]))
    if not allow_remove:
        raise InvalidInput(TCG_REMOVE_REFUSAL, vcpus=target, plugged=len(plugged))
    return CpuPlan(remove=tuple(reversed(plugged[target:])))


# --- PCIe root ports ------------------------------------------------------------------------
def _root_bus_devices(pci_reply: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    for bus in pci_reply:
        if bus.get("bus") == 0:
            return list(bus.get("devices", []))
    return []


def _hotplug_ports(pci_reply: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [d for d in _root_bus_devices(pci_reply)
            if str(d.get("qdev_id", "")).startswith(HOTPLUG_PORT_PREFIX) and "pci_bridge" in d]


def free_root_port(pci_reply: Iterable[Mapping[str, Any]]) -> str:
    """The first spare ``pcie-root-port`` with nothing behind it."""
    for port in sorted(_hotplug_ports(pci_reply), key=lambda d: str(d["qdev_id"])):
        if not port["pci_bridge"].get("devices"):
            return str(port["qdev_id"])
    raise InvalidInput("no free PCIe hot-plug port left on this VM (8 per VM; remove a "
                       "hot-added device or add this one while the VM is off)")


def device_port(pci_reply: Iterable[Mapping[str, Any]], qdev_id: str) -> str | None:
    """The hot-plug port a device sits behind; None when it is on the root complex
    (present since start: q35 cannot hot-remove those)."""
    for port in _hotplug_ports(pci_reply):
        if any(d.get("qdev_id") == qdev_id for d in port["pci_bridge"].get("devices", [])):
            return str(port["qdev_id"])
    return None


# --- memory ---------------------------------------------------------------------------------
def virtio_mem_request(*, base: int, region: int, block: int, target: int) -> int:
    """The virtio-mem ``requested-size`` that gives the guest ``target`` bytes."""
    wanted = target - base
    if wanted < 0:
        raise InvalidInput(
            f"this VM started with {format_size(base)}: virtio-mem can shrink it down to "
            "that; restart it to boot with less", base_bytes=base, memory_bytes=target)
    if wanted > region:
        raise InvalidInput(f"{format_size(target)} exceeds the memory this VM can reach "
                           f"while running ({format_size(base + region)})",
                           memory_bytes=target, max_bytes=base + region)
    if wanted % block:
        raise InvalidInput(f"memory above {format_size(base)} changes in blocks of "
                           f"{format_size(block)}", block_bytes=block)
    return wanted


@dataclass(frozen=True)
class Dimm:
    id: str
    size: int


@dataclass(frozen=True)
class DimmPlan:
    add_id: str | None = None
    add_size: int = 0
    remove: tuple[Dimm, ...] = ()


def dimm_plan(dimms: list[Dimm], *, base: int, max_bytes: int, target: int) -> DimmPlan:
    """Grow with one new DIMM of the difference; shrink by removing whole DIMMs, newest
    first, that add up exactly to the difference (anything else is refused)."""
    current = base + sum(d.size for d in dimms)
    if target > max_bytes:
        raise InvalidInput(f"{format_size(target)} exceeds max memory "
                           f"{format_size(max_bytes)}", memory_bytes=target)
    if target > current:
        delta = target - current
        if delta % DIMM_ALIGN:
            raise InvalidInput(f"pc-dimm memory is added in multiples of "
                               f"{format_size(DIMM_ALIGN)} (Linux memory blocks)")
        if len(dimms) >= MEMORY_HOTPLUG_SLOTS:
            raise InvalidInput("no free memory slot left (8 DIMMs); restart the VM to "
                               "fold them into its boot memory")
        used = {d.id for d in dimms}
        new_id = next(f"{DIMM_PREFIX}{i}" for i in range(64) if f"{DIMM_PREFIX}{i}" not in used)
        return DimmPlan(add_id=new_id, add_size=delta)
    return DimmPlan(remove=_dimms_to_remove(dimms, current - target, base))


def _dimms_to_remove(dimms: list[Dimm], delta: int, base: int) -> tuple[Dimm, ...]:
    removed: list[Dimm] = []
    for dimm in sorted(dimms, key=lambda d: d.id, reverse=True):
        if sum(d.size for d in removed) >= delta:
            break
        removed.append(dimm)
    if sum(d.size for d in removed) != delta:
        raise InvalidInput(
            f"with pc-dimm slots memory shrinks only by whole hot-added DIMMs (boot memory "
            f"{format_size(base)}, DIMMs: "
            f"{', '.join(format_size(d.size) for d in dimms) or 'none'})")
    return tuple(removed)


def parse_dimms(reply: Iterable[Mapping[str, Any]]) -> list[Dimm]:
    return [Dimm(id=str(item["data"].get("id", "")), size=int(item["data"]["size"]))
            for item in reply if item.get("type") == "dimm"]


# --- devices --------------------------------------------------------------------------------
def next_free_id(taken: Iterable[str], prefix: str) -> str:
    used = set(taken)
    return next(f"{prefix}{i}" for i in range(1000) if f"{prefix}{i}" not in used)


def throttle_arguments(device_id: str, resources: ResourceControls,
                       group: str) -> dict[str, Any]:
    """``block_set_io_throttle`` for one disk; the group makes the limit shared by all
    disks of the VM (Hyper-V's limit is per VM here, see docs/hot-add.md)."""
    return {"id": device_id, "group": group,
            "iops": resources.disk_iops_limit, "iops_rd": 0, "iops_wr": 0,
            "bps": resources.disk_bandwidth_bytes, "bps_rd": 0, "bps_wr": 0}
