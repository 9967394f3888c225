"""``vm nic add|remove`` and ``vm disk add|remove``: on a running VM through hot-plug,
on a stopped one in the definition only.

Order matters and is the same every time: the backend first (tap plugged into its
switch, or the image file created and given to QEMU's user), then QEMU (netdev/
blockdev, then the device on a free PCIe root port), then the definition. Removal is
the reverse, and waits for the guest to release the device (``DEVICE_DELETED``) before
the backend goes. A failure undoes what this request did, so the definition and the
running VM keep agreeing.

Never used for devices present since start that sit on the root complex: q35 cannot
hot-remove those (a clear refusal says to remove them while the VM is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import stat
from pathlib import Path
from typing import Any

from parvisor.errors import InvalidInput, NotFound, Refused, StateError
from parvisor.model.states import ACTIVE_STATES, VmState, check_action
from parvisor.model.validation import validate_model
from parvisor.model.vm import DiskBoot, DiskSpec, NicSpec
from parvisor.ops import hotplug_devices as qmp_dev
from parvisor.ops.disks import (_give_to, check_shareable, check_sharing, disk_uses,
                                vm_disk_dir)
from parvisor.ops.hotplug_plan import device_port, free_root_port, next_free_id
from parvisor.ops.nics import _uid, macs_in_use, nic_specs
from parvisor.ops.requests import AddDisk, AddNic
from parvisor.storage import disks as files
from parvisor.storage.qemu_img import create_image
from parvisor.storage.roots import require_file, resolve_in_roots
from parvisor.store.base import VmRecord
from parvisor.vm.argv import disk_device_id, nic_device_id

S = VmState
OFFLINE_STATES = (S.OFF, S.CRASHED)


class NotOnThisHost(Refused):
    """A device change for a VM whose QEMU runs on another cluster host."""

    code = "wrong_host"
    http_status = 409


class HotplugIo:
    """Network adapters and disks; ``hotplug`` is the HotplugManager (persist, vms)."""

    def __init__(self, hotplug: Any) -> None:
        self.hotplug = hotplug
        self.vms = hotplug.vms

    # --- shared -------------------------------------------------------------------------------
    def _lookup(self, name: str) -> tuple[VmRecord, bool]:
        """The record and whether it runs (hot-plug) or is off (definition only)."""
        record = self.vms.store.get_vm(name)
        if record.state in OFFLINE_STATES:
            return record, False
        if record.state in ACTIVE_STATES:
            check_action("hot-plug", record.state, vm=name)
            return record, True
        raise StateError("change the devices of", record.state.value,
                         [S.OFF.value, S.CRASHED.value, S.RUNNING.value], vm=name)

    async def _locked(self, name: str, operation: str, work) -> dict[str, Any]:
        record, running = self._lookup(name)
        runtime = self.vms.runtime(record.uuid)
        async with runtime.exclusive(operation, name):
            record, running = self._lookup(name)        # may have changed meanwhile
            if running and runtime.process is None:
                # a cluster VM running on another host: changing only its definition
                # here would leave the running VM and the definition disagreeing
                host = self.vms.show(name).host
                where = (f"runs on host {host}, not here: change its devices on that host"
                         if host != self.vms.config.host_name else
                         "is recorded running but this service has no QEMU of it (yet): "
                         "try again once it is re-adopted, or change it")
                raise NotOnThisHost(f"VM '{name}' {where} (or while it is off)",
                                    vm=name, host=host)
            result = await work(record, runtime.process if running else None)
        return {"vm": self.vms.show(name).model_dump(mode="json"), **result}

    # --- network adapters -----------------------------------------------------------------------
    async def add_nic(self, name: str, request: AddNic) -> dict[str, Any]:
        async def work(record: VmRecord, process: Any) -> dict[str, Any]:
            nic = self._new_nic(record, request)
            if process is not None:
                await self._plug_nic(record, process, nic)
            self.hotplug.persist(record, f"network adapter {nic.id} added",
                                 nics=(*record.definition.nics, nic))
            return {"nic": nic.model_dump()}
        return await self._locked(name, "nic add", work)

    def _new_nic(self, record: VmRecord, request: AddNic) -> NicSpec:
        if self.vms.switches is None:
            raise InvalidInput("this host has no switch manager: NICs are not available")
        ids = [n.id for n in record.definition.nics] + [d.id for d in record.definition.disks]
        index = int(next_free_id(ids, "nic").removeprefix("nic"))
        in_use = macs_in_use(r.definition for r in self.vms.store.list_vms())
        spec = nic_specs([request], self.vms.switches, in_use, first_index=index)[0]
        if len(record.definition.nics) >= 8:
            raise InvalidInput("at most 8 network adapters per VM")
        return spec

    async def _plug_nic(self, record: VmRecord, process: Any, nic: NicSpec) -> None:
        port = free_root_port(await qmp_dev.pci_devices(process))
        switches = self.vms.switches
        await asyncio.to_thread(switches.attach_nic, record.uuid, nic,
                                owner_uid=_uid(self.vms._qemu_user()))
        try:
            await qmp_dev.add_nic(process, record.uuid, nic, port)
        except BaseException:
            await asyncio.to_thread(switches.detach_nic, record.uuid, nic.id)
            raise

    async def remove_nic(self, name: str, nic_id: str) -> dict[str, Any]:
        async def work(record: VmRecord, process: Any) -> dict[str, Any]:
            nic = _find(record.definition.nics, nic_id, "network adapter", name)
            if process is not None:
                await self._check_removable(process, nic_device_id(nic), nic_id, name)
                await qmp_dev.remove_nic(process, nic)
                await asyncio.to_thread(self.vms.switches.detach_nic, record.uuid, nic.id)
            self.hotplug.persist(record, f"network adapter {nic.id} removed",
                                 nics=tuple(n for n in record.definition.nics if n.id != nic_id),
                                 boot_order=_without(record, nic_id))
            return {"removed": nic_id}
        return await self._locked(name, "nic remove", work)

    @staticmethod
    async def _check_removable(process: Any, qdev_id: str, dev_id: str, name: str) -> None:
        if device_port(await qmp_dev.pci_devices(process), qdev_id) is None:
            raise InvalidInput(f"{dev_id} of VM '{name}' was present at start and sits on "
                               "the PCIe root complex, which cannot hot-remove devices; "
                               "remove it while the VM is off", vm=name, device=dev_id)

    # --- disks ------------------------------------------------------------------------------------
    async def add_disk(self, name: str, request: AddDisk) -> dict[str, Any]:
        if request.shared and request.path is None:
            raise InvalidInput("a shared disk is an existing raw image: create it first "
                               "('parvisor disk create PATH --size SIZE --format raw'), "
                               "then add it to each VM with --shared PATH")
        if (request.size is None) == (request.path is None):
            raise InvalidInput("give exactly one of --size (a new disk) or --path (an "
                               "existing image)")

        async def work(record: VmRecord, process: Any) -> dict[str, Any]:
            disk = self._new_disk_spec(record, request)
            created = self._create_file(disk, request) if request.size else None
            try:
                if process is not None:
                    await self._plug_disk(process, disk)
                self.hotplug.persist(record, f"disk {disk.id} added",
                                     disks=(*record.definition.disks, disk))
            except BaseException:
                if created is not None:
                    created.unlink(missing_ok=True)
                raise
            return {"disk": disk.model_dump()}
        return await self._locked(name, "disk add", work)

    def _new_disk_spec(self, record: VmRecord, request: AddDisk) -> DiskSpec:
        roots = tuple(self.vms.config.storage_roots)
        d = record.definition
        disk_id = next_free_id([x.id for x in d.disks] + [n.id for n in d.nics], "disk")
        if request.size is not None:
            fmt = request.format or "qcow2"
            files.check_size(int(request.size))
            path = files.new_file_target(vm_disk_dir(roots, d.uuid) / f"{disk_id}.{fmt}", roots)
            return DiskSpec(id=disk_id, path=str(path), format=fmt, bus=request.bus,
                            owned=True)
        path = require_file(resolve_in_roots(request.path, roots), what="disk")
        fmt = request.format or files.format_of(path, roots)
        bus = request.bus
        if request.shared and "bus" not in request.model_fields_set:
            bus = "virtio-scsi"             # the only bus a shared disk can sit on
        spec = validate_model(DiskSpec, {"id": disk_id, "path": str(path), "format": fmt,
                                         "bus": bus, "readonly": request.readonly,
                                         "shared": request.shared})
        files.validated_chain(path, fmt, roots)
        self._check_users(record, spec)
        if spec.shared:
            check_shareable(path, getattr(self.vms, "shared_storage", None))
        self._check_qemu_access(path, request.readonly)
        return spec

    def _check_users(self, record: VmRecord, disk: DiskSpec) -> None:
        """A file is one VM's, or shared by VMs that all attached it as shared."""
        uses = disk_uses(self.vms.store, disk.path)
        if record.name in {vm for vm, _ in uses}:
            raise InvalidInput(f"VM '{record.name}' already has {disk.path}",
                               path=disk.path, vm=record.name)
        check_sharing(disk, uses, exclusive=True)

    def _create_file(self, disk: DiskSpec, request: AddDisk) -> Path:
        target = Path(disk.path)
        with files.atomic_new_file(target) as temporary:
            create_image(temporary, disk.format, int(request.size))
        _give_to(target, self.vms._qemu_user())    # QEMU opens it after dropping root
        return target

    def _check_qemu_access(self, path: Path, readonly: bool) -> None:
        """QEMU opens hot-added images as its own user: refuse what it could not open,
        instead of changing the owner of a user's file behind their back."""
        user = self.vms._qemu_user()
        if not user:
            return
        entry, info = pwd.getpwnam(user), path.stat()
        need = stat.S_IRUSR | (0 if readonly else stat.S_IWUSR)
        if info.st_uid == entry.pw_uid and info.st_mode & need == need:
            return
        other = (stat.S_IROTH | (0 if readonly else stat.S_IWOTH))
        group = (stat.S_IRGRP | (0 if readonly else stat.S_IWGRP))
        if info.st_mode & other == other or (info.st_gid == entry.pw_gid
                                             and info.st_mode & group == group):
            return
        raise InvalidInput(f"QEMU runs as '{user}' and could not open {path} while the VM "
                           f"runs: give that user access (e.g. chown {user} {path})",
                           path=str(path), user=user)

    async def _plug_disk(self, process: Any, disk: DiskSpec) -> None:
        port = None
        if disk.bus == "virtio-blk":
            port = free_root_port(await qmp_dev.pci_devices(process))
        elif not await qmp_dev.has_scsi_controller(process):
            # The controller comes on demand and stays (at the next start argv adds it)
            await qmp_dev.add_scsi_controller(process, free_root_port(
                await qmp_dev.pci_devices(process)))
        direct = disk.shared or files.supports_direct_io(disk.path)
        await qmp_dev.add_disk(process, disk, port, direct)

    async def remove_disk(self, name: str, disk_id: str) -> dict[str, Any]:
        async def work(record: VmRecord, process: Any) -> dict[str, Any]:
            disk = _find(record.definition.disks, disk_id, "disk", name)
            _check_disk_removable(record, disk, running=process is not None)
            if process is not None:
                if disk.bus == "virtio-blk":
                    await self._check_removable(process, disk_device_id(disk), disk_id, name)
                await qmp_dev.remove_disk(process, disk)
            self.hotplug.persist(record, f"disk {disk.id} removed",
                                 disks=tuple(x for x in record.definition.disks
                                             if x.id != disk_id),
                                 boot_order=_without(record, disk_id))
            if disk.owned and disk.path:       # made for this VM: nobody else has it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.path)
            return {"removed": disk_id, "deleted_file": disk.path if disk.owned else None}
        return await self._locked(name, "disk remove", work)


def _find(items: tuple, item_id: str, what: str, vm: str) -> Any:
    for item in items:
        if item.id == item_id:
            return item
    raise NotFound(f"VM '{vm}' has no {what} '{item_id}' (see 'parvisor vm show {vm}')",
                   vm=vm, device=item_id)


def _without(record: VmRecord, dev_id: str) -> tuple[str, ...]:
    return tuple(x for x in record.definition.boot_order if x != dev_id)


def _check_disk_removable(record: VmRecord, disk: DiskSpec, *, running: bool) -> None:
    d = record.definition
    if disk.media == "cdrom":
        raise InvalidInput(f"{disk.id} is a CD/DVD drive: use 'vm cdrom eject'")
    boots = d.boot_order[:1] == (disk.id,) or (
        not d.boot_order and isinstance(d.boot, DiskBoot) and d.disks[:1] == (disk,))
    if boots:
        raise InvalidInput(f"{disk.id} is the boot disk of VM '{d.name}'; it cannot be "
                           "removed", vm=d.name, device=disk.id)
    if running and disk.bus in ("ide", "ahci"):
        raise InvalidInput(f"{disk.id} is on the {disk.bus} bus, which cannot hot-remove "
                           "devices; remove it while the VM is off", device=disk.id)
