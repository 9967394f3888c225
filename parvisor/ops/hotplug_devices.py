"""QMP effects of hot-add / hot-remove on one running QEMU (the adapter).

Each function sends the QMP commands for one device change and returns once QEMU has
confirmed it; removals also wait for ``DEVICE_DELETED`` (the guest let go of the
device) before the backend (netdev, block nodes, memory backend) is dropped, since
QEMU refuses to delete a backend a device still uses. A guest that does not release a
device within the timeout gets a ``VmError`` that says so; the device stays as it was.

No decisions here (``hotplug_plan`` makes them), no store, no files.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
from typing import Any

from parvisor.errors import QmpError, VmError
from parvisor.model.vm import DiskSpec, NicSpec
from parvisor.ops.hotplug_plan import CpuSlot, Dimm, parse_cpu_slots, parse_dimms
from parvisor.vm.argv import (BALLOON_ID, SCSI_CONTROLLER_ID, VIRTIO_MEM_ID, disk_device_id,
                              disk_node_names, netdev_id, nic_device_id, shared_disk_props,
                              tap_name)

UNPLUG_TIMEOUT_S = 10.0
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
PERIPHERAL = "/machine/peripheral"


async def _qmp(process: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    return await process.qmp.execute(command, arguments)


# --- removal with the guest's consent ----------------------------------------------------------
def deleted_matcher(device: str, *, children: bool = False):
    """Matches QEMU's DEVICE_DELETED for ``device`` (id or QOM path). With
    ``children``, a child's event counts too: QEMU 7.2 reports a vCPU's removal only
    as its ``.../lapic`` child."""
    path = device if device.startswith("/") else f"{PERIPHERAL}/{device}"

    def match(data: dict[str, Any]) -> bool:
        seen = str(data.get("path", ""))
        return (data.get("device") == device or seen == path
                or (children and seen.startswith(path + "/")))
    return match


async def unplug(process: Any, device: str, what: str,
                 timeout: float = UNPLUG_TIMEOUT_S, *, children: bool = False) -> None:
    """``device_del`` (by id or QOM path) and wait until QEMU reports it gone."""
    gone = process.expect_event("DEVICE_DELETED", deleted_matcher(device, children=children))
    try:
        await _qmp(process, "device_del", {"id": device})
        await asyncio.wait_for(asyncio.shield(gone), timeout)
    except asyncio.TimeoutError:
        raise VmError(f"the guest did not release {what} within {timeout:g} s (it may "
                      "not support hot-remove, or still uses it); nothing was changed",
                      device=device, timeout_s=timeout) from None
    finally:
        gone.cancel()


# --- processors ------------------------------------------------------------------------------
async def cpu_slots(process: Any) -> list[CpuSlot]:
    return parse_cpu_slots(await _qmp(process, "query-hotpluggable-cpus"))


async def add_cpu(process: Any, slot: CpuSlot) -> None:
    await _qmp(process, "device_add", {"driver": slot.type, "id": slot.device_id,
                                       **dict(slot.props)})


async def remove_cpu(process: Any, slot: CpuSlot) -> None:
    assert slot.qom_path is not None
    await unplug(process, slot.qom_path, f"vCPU {slot.device_id}", children=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UNPLUG_TIMEOUT_S
    while any(s.qom_path == slot.qom_path for s in await cpu_slots(process)):
        if loop.time() > deadline:      # the lapic went, the CPU did not: say so
            raise VmError(f"vCPU {slot.device_id} is still present after its removal "
                          "was confirmed", device=slot.device_id)
        await asyncio.sleep(0.05)     # polling QEMU's own list, bounded by the deadline


# --- memory -------------------------------------------------------------------------------------
async def memory_summary(process: Any) -> tuple[int, int]:
    """(boot memory, hot-plugged memory) in bytes, as QEMU counts them."""
    reply = await _qmp(process, "query-memory-size-summary")
    return int(reply["base-memory"]), int(reply.get("plugged-memory", 0))


async def _vmem_get(process: Any, prop: str) -> int:
    return int(await _qmp(process, "qom-get", {"path": f"{PERIPHERAL}/{VIRTIO_MEM_ID}",
                                               "property": prop}))


async def virtio_mem_state(process: Any) -> dict[str, int]:
    """block-size, region (memdev) size, plugged size and requested size."""
    try:
        values = {p: await _vmem_get(process, p)
                  for p in ("block-size", "size", "requested-size")}
        memdev = await _qmp(process, "qom-get", {"path": f"{PERIPHERAL}/{VIRTIO_MEM_ID}",
                                                 "property": "memdev"})
        values["region"] = int(await _qmp(process, "qom-get", {"path": memdev,
                                                               "property": "size"}))
    except QmpError as exc:
        raise VmError("this VM has no virtio-mem device (it started without memory "
                      "headroom, or with another layout): restart it to use it") from exc
    return values


async def set_virtio_mem(process: Any, requested: int) -> None:
    await _qmp(process, "qom-set", {"path": f"{PERIPHERAL}/{VIRTIO_MEM_ID}",
                                    "property": "requested-size", "value": requested})


async def wait_virtio_mem(process: Any, requested: int, timeout: float) -> int:
    """Wait for the guest driver to (un)plug blocks; return the size reached."""
    loop = asyncio.get_running_loop()
    deadline, size = loop.time() + timeout, -1
    while loop.time() < deadline:
        size = await _vmem_get(process, "size")
        if size == requested:
            break
        await asyncio.sleep(0.1)     # polling a device property, bounded by the deadline
    return size


async def dimms(process: Any) -> list[Dimm]:
    return parse_dimms(await _qmp(process, "query-memory-devices"))


async def add_dimm(process: Any, dimm_id: str, size: int) -> None:
    backend = f"{dimm_id}-mem"
    await _qmp(process, "object-add", {"qom-type": "memory-backend-ram", "id": backend,
                                       "size": size})
    try:
        await _qmp(process, "device_add", {"driver": "pc-dimm", "id": dimm_id,
                                           "memdev": backend})
    except VmError:
        await _qmp(process, "object-del", {"id": backend})
        raise


async def remove_dimm(process: Any, dimm: Dimm) -> None:
    await unplug(process, dimm.id, f"memory DIMM {dimm.id}")
    await _qmp(process, "object-del", {"id": f"{dimm.id}-mem"})


# --- balloon ---------------------------------------------------------------------------------------
async def set_balloon(process: Any, target: int) -> None:
    await _qmp(process, "balloon", {"value": target})


async def balloon_actual(process: Any) -> int:
    return int((await _qmp(process, "query-balloon"))["actual"])


async def enable_guest_stats(process: Any, interval_s: int) -> None:
    await _qmp(process, "qom-set", {"path": f"{PERIPHERAL}/{BALLOON_ID}",
                                    "property": "guest-stats-polling-interval",
                                    "value": interval_s})


async def guest_stats(process: Any) -> dict[str, int]:
    reply = await _qmp(process, "qom-get", {"path": f"{PERIPHERAL}/{BALLOON_ID}",
                                            "property": "guest-stats"})
    return {k: int(v) for k, v in (reply.get("stats") or {}).items()}


# --- network adapters -----------------------------------------------------------------------------
def open_tap(name: str) -> int:
    """Open the (already created and plugged) persistent tap ``name`` as root.

    A QEMU that dropped to an unprivileged user cannot open /dev/net/tun itself any
    more, so the service opens the tap and passes the descriptor (as libvirt does)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise VmError(f"cannot open tap {name}: {exc.strerror}", tap=name) from exc
    return fd


async def add_nic(process: Any, vm_uuid: str, nic: NicSpec, port: str) -> None:
    fd_name = f"tap-{netdev_id(nic)}"
    fd = open_tap(tap_name(vm_uuid, nic.id))
    try:
        await process.qmp.send_fd(fd, fd_name)
    finally:
        os.close(fd)          # QEMU holds its own copy now
    await _qmp(process, "netdev_add", {"type": "tap", "id": netdev_id(nic), "fd": fd_name})
    model = "virtio-net-pci" if nic.model == "virtio" else "e1000"
    try:
        await _qmp(process, "device_add", {"driver": model, "id": nic_device_id(nic),
                                           "netdev": netdev_id(nic), "mac": nic.mac,
                                           "bus": port})
    except VmError:
        await _qmp(process, "netdev_del", {"id": netdev_id(nic)})
        raise


async def remove_nic(process: Any, nic: NicSpec) -> None:
    await unplug(process, nic_device_id(nic), f"network adapter {nic.id}")
    await _qmp(process, "netdev_del", {"id": netdev_id(nic)})


# --- disks -------------------------------------------------------------------------------------------
def blockdev_nodes(disk: DiskSpec, direct_io: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two nodes of ``argv.disk_blockdev_args`` as ``blockdev-add`` arguments."""
    assert disk.path is not None
    file_node, fmt_node = disk_node_names(disk)
    writes = {} if disk.readonly else {"discard": "unmap"}
    file_args = {"driver": "file", "node-name": file_node, "filename": disk.path,
                 "read-only": disk.readonly, "cache": {"direct": direct_io},
                 "aio": "native" if direct_io else "threads", **writes}
    fmt_args = {"driver": disk.format, "node-name": fmt_node, "file": file_node,
                "read-only": disk.readonly, "cache": {"direct": direct_io}, **writes}
    if not disk.readonly:
        fmt_args["detect-zeroes"] = "unmap"
    return file_args, fmt_args


async def add_disk(process: Any, disk: DiskSpec, port: str | None, direct_io: bool) -> None:
    file_args, fmt_args = blockdev_nodes(disk, direct_io)
    added: list[str] = []
    try:
        for node in (file_args, fmt_args):
            await _qmp(process, "blockdev-add", node)
            added.append(node["node-name"])
        await _qmp(process, "device_add", _disk_device(disk, port))
    except VmError:
        for node_name in reversed(added):
            await _qmp(process, "blockdev-del", {"node-name": node_name})
        raise


def _disk_device(disk: DiskSpec, port: str | None) -> dict[str, Any]:
    common = {"id": disk_device_id(disk), "drive": disk_node_names(disk)[1]}
    if disk.bus == "virtio-scsi":
        shared = {key: value == "on" if key == "share-rw" else value
                  for key, value in shared_disk_props(disk).items()}
        return {"driver": "scsi-hd", "bus": f"{SCSI_CONTROLLER_ID}.0", **common, **shared}
    return {"driver": "virtio-blk-pci", "bus": port, **common}


async def has_scsi_controller(process: Any) -> bool:
    try:
        await _qmp(process, "qom-get", {"path": f"{PERIPHERAL}/{SCSI_CONTROLLER_ID}",
                                        "property": "type"})
        return True
    except QmpError:
        return False


async def add_scsi_controller(process: Any, port: str) -> None:
    await _qmp(process, "device_add", {"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER_ID,
                                       "bus": port})


async def remove_disk(process: Any, disk: DiskSpec) -> None:
    await unplug(process, disk_device_id(disk), f"disk {disk.id}")
    for node_name in reversed(disk_node_names(disk)):
        await _qmp(process, "blockdev-del", {"node-name": node_name})


async def set_io_throttle(process: Any, arguments: dict[str, Any]) -> None:
    await _qmp(process, "block_set_io_throttle", arguments)


async def pci_devices(process: Any) -> list[dict[str, Any]]:
    return await _qmp(process, "query-pci")
