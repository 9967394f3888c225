"""``vm clone NAME NEW [--linked]`` and the template rule.

* full clone: every writable disk is flattened (``qemu-img convert`` to qcow2, chain
  and checkpoints left behind) into the new VM's own folder; read-only disks and
  user-given ISOs are shared by path; the VM's own CD media (cloud-init seed) copied.
* linked clone: every writable disk of the new VM is a differencing child over the
  source's disk. The source becomes a *template* (``VmDefinition.template``): it is
  refused start, checkpoints and edits of its disks while any image in the storage
  roots still names one of its disks as parent; once none does, the next start
  clears the flag. Deleting it is refused by the usual "parent of" disk check.

Both get a new uuid and new MACs, and both refuse a running source (its disks change
under the copy). Nothing is registered unless every file was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parvisor.errors import AlreadyExists, Busy, InvalidInput, NotFound, StateError
from parvisor.model.states import VmState
from parvisor.model.vm import DiskSpec, VmDefinition
from parvisor.ops.copy_requests import CloneVm
from parvisor.ops.disks import vm_disk_dir
from parvisor.ops.export import refuse_shared_disks
from parvisor.ops.jobs import Job
from parvisor.ops.nics import macs_in_use
from parvisor.ops.vm_copies import PlacedFiles, copy_file, fresh_identity, placed_files
from parvisor.storage.chains import children_of
from parvisor.storage.qemu_img import convert_image, create_image, inspect_image
from parvisor.store.base import VmRecord

S = VmState
CLONE_STATES = (S.OFF, S.CRASHED)


def template_children(definition: VmDefinition, roots: tuple[Path, ...]) -> list[Path]:
    """Images that use one of the VM's disks as their parent (its linked clones)."""
    found: list[Path] = []
    for disk in definition.disks:
        if disk.media == "disk" and disk.path and Path(disk.path).exists():
            found += children_of(Path(disk.path), roots)
    return found


def release_template_if_unused(vms: Any, record: VmRecord) -> VmRecord:
    """Called before a start: refuse a template with linked clones; clear the flag of
    one whose clones are all gone (so starting it cannot corrupt anything)."""
    if not record.definition.template:
        return record
    children = template_children(record.definition, tuple(vms.config.storage_roots))
    if children:
        raise InvalidInput(
            f"VM '{record.name}' is a template with {len(children)} linked clone disk(s) "
            f"({', '.join(map(str, children[:3]))}): it cannot start while they depend on "
            "it; delete the linked clones first", vm=record.name,
            children=[str(c) for c in children])
    data = {**record.definition.model_dump(), "template": False}
    updated = vms.store.update_definition(VmDefinition.model_validate(data),
                                          record.generation)
    vms.event("edited", f"{record.name}: no linked clones left; no longer a template",
              updated)
    return updated


class CloneManager:
    def __init__(self, vms: Any) -> None:
        self.vms = vms
        self.store = vms.store
        self.roots = tuple(vms.config.storage_roots)

    def clone(self, name: str, request: CloneVm) -> Job:
        record = self.store.get_vm(name)
        self._check(record, request.new_name)
        runtime = self.vms.runtime(record.uuid)
        if runtime.lock.locked():
            raise Busy(f"VM '{name}' is busy: {runtime.operation} in progress", vm=name)

        async def work(job: Job) -> Any:
            async with runtime.exclusive("clone", name):   # the source cannot start now
                source = self.store.get_vm(name)
                self._check(source, request.new_name)
                return await self._clone(source, request, job)
        return self.vms.jobs.start("clone", work, vm_name=name)

    def _check(self, record: VmRecord, new_name: str) -> None:
        if record.state not in CLONE_STATES:
            raise StateError("clone", record.state.value, [s.value for s in CLONE_STATES],
                             vm=record.name)
        refuse_shared_disks("clone", record.definition)
        try:
            self.store.get_vm(new_name)
        except NotFound:
            return
        raise AlreadyExists(f"a VM named '{new_name}' already exists", name=new_name)

    async def _clone(self, source: VmRecord, request: CloneVm, job: Job) -> Any:
        import asyncio
        data = fresh_identity(source.definition.model_dump(mode="json"), request.new_name,
                              macs_in_use(r.definition for r in self.store.list_vms()))
        folder = vm_disk_dir(self.roots, data["uuid"])
        marked = request.linked and not source.definition.template
        if marked:                 # first: from here on the source refuses to start
            source = self._set_template(source, True)
        try:
            with placed_files(self.roots) as placed:
                disks = []
                for index, disk in enumerate(source.definition.disks):
                    job.report(0.1 + 0.8 * index / max(1, len(source.definition.disks)),
                               f"disk {disk.id}")
                    disks.append(await asyncio.to_thread(
                        self._copy_disk, disk, folder, placed, request.linked))
                definition = VmDefinition.model_validate({**data, "disks": disks})
                record = self.store.create_vm(definition)
        except BaseException:
            if marked:
                self._set_template(self.store.get_vm_by_uuid(source.uuid), False)
            raise
        how = "linked clone" if request.linked else "full clone"
        self.vms.event("created", f"{record.name}: created as {how} of {source.name}",
                       record, source=source.name, linked=request.linked)
        return self.vms.show(record.name).model_dump(mode="json")

    def _copy_disk(self, disk: DiskSpec, folder: Path, placed: PlacedFiles,
                   linked: bool) -> dict[str, Any]:
        spec = disk.model_dump()
        if disk.path is None or (disk.readonly and not disk.owned):
            return {**spec, "owned": False}          # shared by path (bases, ISOs, empty)
        source = Path(disk.path)
        if disk.media == "cdrom" or disk.readonly:
            target = placed.place(folder / source.name, lambda t: copy_file(source, t))
        elif linked:
            size = inspect_image(source, disk.format).virtual_size
            target = placed.place(folder / f"{disk.id}.qcow2", lambda t: create_image(
                t, "qcow2", size, backing=source, backing_format=disk.format))
        else:
            target = placed.place(folder / f"{disk.id}.qcow2", lambda t: convert_image(
                source, disk.format, t, "qcow2"))
        fmt = disk.format if disk.media == "cdrom" or disk.readonly else "qcow2"
        return {**spec, "path": str(target), "format": fmt, "owned": True}

    def _set_template(self, record: VmRecord, template: bool) -> VmRecord:
        data = {**record.definition.model_dump(), "template": template}
        updated = self.store.update_definition(VmDefinition.model_validate(data),
                                               record.generation)
        self.vms.event("edited", f"{record.name}: {'now' if template else 'no longer'} "
                       "a template", updated, template=template)
        return updated
