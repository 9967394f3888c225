"""Disk operations: the ``disk …`` commands, the disk part of ``vm create``/``vm delete``,
and CD/DVD insert/eject. Each one checks first (refusals change nothing), then acts.

What is checked here and not in ``parvisor.storage``: anything that needs the VM store
(which VMs use a file, in which state they are) or a running QEMU (media changes go
through the VM's QMP session). File rules (roots, chains, atomic creation) are
``parvisor.storage.disks``'s. This module never builds QEMU command lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
from pathlib import Path
from typing import Any, Iterator

from parvisor.config import HostConfig
from parvisor.errors import InvalidInput, NotFound, StateError
from parvisor.model.states import VmState
from parvisor.model.validation import validate_model
from parvisor.model.vm import DiskSpec, VmDefinition
from parvisor.ops.disk_requests import (AttachDisk, ConvertDisk, CreateDisk, InsertCdrom,
                                        NewDisk, ResizeDisk)
from parvisor.storage import disks as files
from parvisor.storage.chains import children_of, walk_chain
from parvisor.storage.qemu_img import create_image
from parvisor.storage.roots import require_file, resolve_in_roots
from parvisor.store.base import Store
from parvisor.vm.argv import disk_device_id

log = logging.getLogger(__name__)
S = VmState
VM_DISK_DIR = "vms"            # <first storage root>/vms/<vm uuid>/<disk id>.<format>
CDROM_BUS = "ahci"             # q35's built-in AHCI: every BIOS/UEFI and guest knows it
MEDIA_STATES = (S.OFF, S.CRASHED, S.RUNNING, S.PAUSED)


# --- disks of a new VM --------------------------------------------------------------------
def attached_disk_specs(attach: list[AttachDisk], roots: tuple[Path, ...]) -> list[DiskSpec]:
    """Existing images for a new VM: in the roots, whole chain checked, not damaged."""
    specs = []
    for index, item in enumerate(attach):
        path = resolve_in_roots(item.path, roots)
        require_file(path, what="disk")
        fmt = item.format or files.format_of(path, roots)
        bus = item.bus
        if item.shared and "bus" not in item.model_fields_set:
            bus = "virtio-scsi"             # the only bus a shared disk can sit on
        spec = validate_model(DiskSpec, {"id": f"disk{index}", "path": str(path),
                                         "format": fmt, "bus": bus,
                                         "readonly": item.readonly, "shared": item.shared})
        files.validated_chain(path, fmt, roots)
        specs.append(spec)
    return specs


# --- shared disks (guest clustering) ------------------------------------------------------
def disk_uses(store: Store, path: str) -> list[tuple[str, bool]]:
    """(VM name, attached as shared) for every VM whose definition names ``path``."""
    return [(r.name, x.shared) for r in store.list_vms()
            for x in r.definition.disks if x.path == path]


def check_sharing(disk: DiskSpec, uses: list[tuple[str, bool]], *,
                  exclusive: bool) -> None:
    """A file is shared only by VMs that all attached it as shared; ``exclusive``
    (hot-add of a plain disk) also refuses a plain disk another VM has."""
    users = sorted({vm for vm, _ in uses})
    all_shared = all(shared for _, shared in uses)
    if not uses or (disk.shared and all_shared):
        return
    if disk.shared:
        raise InvalidInput(f"{disk.path} is a plain (not shared) disk of VM(s) "
                           f"{', '.join(users)}: a second writer would corrupt it",
                           path=disk.path, vms=users)
    if all_shared:
        raise InvalidInput(f"{disk.path} is already used by VM(s) {', '.join(users)} as a "
                           "shared disk: add it with --shared", path=disk.path, vms=users)
    if exclusive:
        raise InvalidInput(f"{disk.path} is already used by VM(s) {', '.join(users)}",
                           path=disk.path, vms=users)


def check_shareable(path: Path, cluster_root: Path | None) -> None:
    """Where a shared disk may live: on storage every node can reach without a host
    page cache in between (and, in a cluster, on the cluster's shared storage)."""
    if cluster_root is not None and not path.resolve().is_relative_to(
            Path(cluster_root).resolve()):
        raise InvalidInput(f"{path} is not on the cluster's shared storage "
                           f"({cluster_root}): other hosts could not open it, and "
                           "recovery could not bring the VMs elsewhere", path=str(path),
                           shared_storage=str(cluster_root))
    if not files.supports_direct_io(path):
        raise InvalidInput(f"the file system under {path} does not support O_DIRECT: "
                           "a shared disk needs cache=none (no host page cache "
                           "between the VMs)", path=str(path))


def check_new_vm_sharing(store: Store, disks: list[DiskSpec],
                         cluster_root: Path | None) -> None:
    """``vm create --disk PATH[,shared]``: shared and plain uses of one file never mix
    (plain disks of several VMs stay allowed at create, e.g. read-only bases)."""
    for disk in disks:
        if disk.path and disk.media == "disk":
            check_sharing(disk, disk_uses(store, disk.path), exclusive=False)
            if disk.shared:
                check_shareable(Path(disk.path), cluster_root)


def vm_disk_dir(roots: tuple[Path, ...], vm_uuid: str) -> Path:
    """Where parvisor keeps the files it makes for one VM (removed with the VM).

    Keyed by uuid, not name: a name can be reused while leftovers of an interrupted
    delete still lie around."""
    return Path(roots[0]) / VM_DISK_DIR / vm_uuid


def new_disk_specs(vm_uuid: str, new: list[NewDisk], first_index: int,
                   roots: tuple[Path, ...]) -> list[DiskSpec]:
    """Specs (not files yet) of a new VM's empty disks; refuses names already taken."""
    specs = []
    for offset, item in enumerate(new):
        files.check_size(int(item.size))
        disk_id = f"disk{first_index + offset}"
        path = vm_disk_dir(roots, vm_uuid) / f"{disk_id}.{item.format}"
        files.new_file_target(path, roots)
        specs.append(DiskSpec(id=disk_id, path=str(path), format=item.format, bus=item.bus,
                              owned=True))
    return specs


def cdrom_spec(iso: str | None, roots: tuple[Path, ...], index: int = 0) -> DiskSpec:
    path = None
    if iso is not None:
        path = str(require_file(resolve_in_roots(iso, roots, what="ISO"), what="ISO"))
    return DiskSpec(id=f"cd{index}", path=path, format="raw", bus=CDROM_BUS, media="cdrom",
                    readonly=True)


@contextlib.contextmanager
def created_vm_disks(definition: VmDefinition, new: list[NewDisk],
                     run_as: str | None) -> Iterator[list[Path]]:
    """Create the VM's own empty disks; remove them again if the block fails."""
    # The new empty disks are the owned ``diskN`` drives; other owned media (the tiny
    # boot child "boot", the cloud-init seed "cidata") are made by ops.vm_media.
    owned = [d for d in definition.disks
             if d.owned and d.media == "disk" and d.id.startswith("disk")]
    created: list[Path] = []
    try:
        for spec, item in zip(owned, new, strict=True):
            target = Path(spec.path)
            with files.atomic_new_file(target) as temporary:
                create_image(temporary, spec.format, int(item.size))
            created.append(target)
            _give_to(target, run_as)
        yield created
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        _remove_empty_dir(owned)
        raise


def _give_to(path: Path, run_as: str | None) -> None:
    # QEMU drops to run_as before it opens disks it did not get at launch (media changes)
    # and needs write access to its own disks whatever it runs as.
    if run_as:
        user = pwd.getpwnam(run_as)
        for item in (path.parent, path):
            os.chown(item, user.pw_uid, user.pw_gid)


def _remove_empty_dir(owned: list[DiskSpec]) -> None:
    for directory in {Path(d.path).parent for d in owned}:
        with contextlib.suppress(OSError):
            directory.rmdir()                # only if empty: never removes user files


# --- disks of a deleted VM ------------------------------------------------------------------
def check_owned_disks_deletable(definition: VmDefinition, roots: tuple[Path, ...]) -> None:
    """Refuse deleting a VM whose own disk is the parent of another image."""
    for disk in definition.disks:
        if disk.owned and disk.path and Path(disk.path).exists():
            children = children_of(Path(disk.path), roots)
            if children:
                raise InvalidInput(
                    f"VM '{definition.name}': its disk {disk.path} is the parent of "
                    f"{', '.join(map(str, children[:5]))}; delete those first",
                    vm=definition.name, path=disk.path, children=[str(c) for c in children])


def remove_owned_disks(definition: VmDefinition) -> list[str]:
    """Delete the files parvisor created for this VM (never user-given disks)."""
    removed = []
    owned = [d for d in definition.disks if d.owned and d.path]
    for disk in owned:
        with contextlib.suppress(FileNotFoundError):
            Path(disk.path).unlink()
            removed.append(disk.path)
    _remove_empty_dir(owned)
    return removed


def buffered_disk_ids(definition: VmDefinition) -> frozenset[str]:
    return frozenset(d.id for d in definition.disks
                     if d.path and not files.supports_direct_io(d.path))


def check_chains_before_start(definition: VmDefinition, roots: tuple[Path, ...]) -> None:
    """Headers may have changed since create (qemu-img rebase): check every chain again
    right before QEMU follows it (cheap: headers only, no full qemu-img check)."""
    for disk in definition.disks:
        if disk.path and disk.media == "disk":
            walk_chain(Path(disk.path), disk.format, roots)
        elif disk.path:
            resolve_in_roots(disk.path, roots, what="ISO")


# --- the disk commands and CD/DVD media ---------------------------------------------------
class DiskManager:
    """``disk create|info|resize|convert|delete`` and ``vm cdrom insert|eject``."""

    def __init__(self, config: HostConfig, store: Store, vms: Any) -> None:
        self.config = config
        self.store = store
        self.vms = vms          # VmManager: runtimes (locks, QMP) and events

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(self.config.storage_roots)

    def create(self, request: CreateDisk) -> dict[str, Any]:
        size = int(request.size) if request.size is not None else None
        return files.create_disk(request.path, self.roots, size=size, fmt=request.format,
                                 parent=request.parent)

    def info(self, path: str) -> dict[str, Any]:
        result = files.disk_info(path, self.roots)
        result["used_by"] = self.users_of(Path(result["path"]))
        return result

    def resize(self, request: ResizeDisk) -> dict[str, Any]:
        path = resolve_in_roots(request.path, self.roots)
        for record in self.store.list_vms():
            if record.state not in (S.OFF, S.CRASHED) and _uses(record.definition, path):
                raise StateError("resize a disk of", record.state.value,
                                 [S.OFF.value, S.CRASHED.value], vm=record.name)
        return files.resize_disk(path, self.roots, int(request.size))

    def convert(self, request: ConvertDisk) -> dict[str, Any]:
        return files.convert_disk(request.source, request.target, self.roots,
                                  source_format=request.source_format, fmt=request.format)

    def delete(self, path: str) -> dict[str, Any]:
        return files.delete_disk(path, self.roots, self.users_of)

    def users_of(self, path: Path) -> list[str]:
        """Names of the VMs whose definition names this file (as disk or CD)."""
        return sorted(r.name for r in self.store.list_vms() if _uses(r.definition, path))

    # --- CD/DVD ---------------------------------------------------------------------------
    async def insert_cdrom(self, name: str, request: InsertCdrom) -> dict[str, Any]:
        iso = require_file(resolve_in_roots(request.path, self.roots, what="ISO"), what="ISO")
        return await self._change_media(name, request.drive, str(iso))

    async def eject_cdrom(self, name: str, drive: str | None = None) -> dict[str, Any]:
        return await self._change_media(name, drive, None)

    async def _change_media(self, name: str, drive_id: str | None,
                            iso: str | None) -> dict[str, Any]:
        record = self.store.get_vm(name)
        _check_media_state(record.state, name)
        runtime = self.vms.runtime(record.uuid)
        async with runtime.exclusive("cdrom", name):
            record = self.store.get_vm(name)
            _check_media_state(record.state, name)
            drive = _find_drive(record.definition, drive_id, create=iso is not None
                                and record.state in (S.OFF, S.CRASHED))
            definition = _with_media(record.definition, drive, iso)   # check first
            if record.state in (S.RUNNING, S.PAUSED):
                await _qmp_change_media(runtime.process, drive, iso)
            updated = self.store.update_definition(definition, record.generation)
            what = f"inserted {iso}" if iso else "ejected"
            self.vms.event("cdrom", f"{name}: {drive.id} {what}", updated,
                           drive=drive.id, path=iso)
        return {"vm": self.vms.show(name).model_dump(mode="json"), "drive": drive.id,
                "path": iso}


def _uses(definition: VmDefinition, path: Path) -> bool:
    return any(d.path and Path(d.path) == path for d in definition.disks)


def _check_media_state(state: VmState, name: str) -> None:
    # A saved VM's device state is frozen in its saved memory: changing media there
    # would surprise the restored guest. Transitional states are another action's.
    if state not in MEDIA_STATES:
        raise StateError("change the CD/DVD of", state.value, [s.value for s in MEDIA_STATES],
                         vm=name)


def _find_drive(definition: VmDefinition, drive_id: str | None, *, create: bool) -> DiskSpec:
    drives = [d for d in definition.disks if d.media == "cdrom"]
    if drive_id is not None:
        drives = [d for d in drives if d.id == drive_id]
        if not drives:
            raise NotFound(f"VM '{definition.name}' has no CD/DVD drive {drive_id!r}",
                           vm=definition.name, drive=drive_id)
    if drives:
        return drives[0]
    if not create:
        raise InvalidInput(f"VM '{definition.name}' has no CD/DVD drive (one is added by "
                           "inserting an ISO while the VM is off)", vm=definition.name)
    taken = {d.id for d in definition.disks} | {n.id for n in definition.nics}
    index = next(i for i in range(len(taken) + 1) if f"cd{i}" not in taken)
    return cdrom_spec(None, (), index)


async def _qmp_change_media(process: Any, drive: DiskSpec, iso: str | None) -> None:
    qmp, device = process.qmp, disk_device_id(drive)
    if iso is not None:
        await qmp.execute("blockdev-change-medium", {
            "id": device, "filename": iso, "format": "raw", "read-only-mode": "read-only"})
        return
    # force: eject even when the guest has locked the tray (Hyper-V ejects too).
    await qmp.execute("blockdev-open-tray", {"id": device, "force": True})
    await qmp.execute("blockdev-remove-medium", {"id": device})


def _with_media(definition: VmDefinition, drive: DiskSpec, iso: str | None) -> VmDefinition:
    data = definition.model_dump()
    data["disks"] = list(data["disks"])
    new_drive = {**drive.model_dump(), "path": iso}
    ids = [d["id"] for d in data["disks"]]
    if drive.id in ids:
        data["disks"][ids.index(drive.id)] = new_drive
    else:
        data["disks"].append(new_drive)
    return VmDefinition.model_validate(data)
