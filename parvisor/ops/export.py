"""``vm export NAME DIR`` and ``vm import DIR [--name NEW] [--copy|--in-place]``.

Export writes a self-contained directory (``parvisor.ops.export_format``): disks are
flattened with ``qemu-img convert`` so the export needs nothing of this host. Only a
stopped VM is exported: its disks are then a consistent point (a running VM's are not;
take a checkpoint, turn it off, export). Import checks everything first (manifest,
versions, sizes, sha256, image headers: no backing file, not damaged, names, switches)
and registers the VM only after its files are in place; a failure removes what it made.

``--copy`` (default) copies the files into the new VM's folder with a new uuid and new
MACs; ``--in-place`` uses the files where they are (DIR must be inside the storage
roots) and keeps the exported uuid and MACs, like Hyper-V's "register in place".
Never writes into an existing non-empty directory, never overwrites a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from parvisor import __version__
from parvisor.errors import AlreadyExists, Busy, InvalidInput, NotFound, StateError, StorageError
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition, upgrade_definition
from parvisor.ops.copy_requests import ExportVm, ImportExport
from parvisor.ops.disks import vm_disk_dir
from parvisor.ops.export_format import (EXPORT_VERSION, FORMAT_NAME, MANIFEST, Manifest,
                                        parse_manifest, referenced_files, safe_relative)
from parvisor.ops.jobs import Job
from parvisor.ops.nics import macs_in_use
from parvisor.ops.vm_copies import copy_file, fresh_identity, placed_files, sha256_of
from parvisor.storage.disks import refuse_damaged
from parvisor.storage.qemu_img import convert_image, inspect_image
from parvisor.storage.roots import resolve_in_roots
from parvisor.switch import validate_mac

S = VmState
EXPORT_STATES = (S.OFF, S.CRASHED)


# --- export ----------------------------------------------------------------------------
def refuse_shared_disks(action: str, definition: VmDefinition) -> None:
    """A shared disk is written by the guest cluster's other VMs while this one is off:
    a copy of it is no consistent point, and an import would split the cluster's disk
    in two. Export and clone refuse instead of copying it silently."""
    shared = [d.id for d in definition.disks if d.shared]
    if shared:
        raise InvalidInput(f"VM '{definition.name}' has shared disk(s) {', '.join(shared)} "
                           f"(guest clustering): {action} would copy a disk other VMs keep "
                           "writing; remove it from this VM first (vm disk remove) and "
                           "add it back afterwards", vm=definition.name, disks=shared)


def check_export_dir(directory: str) -> Path:
    target = Path(directory)
    if not target.is_absolute():
        raise InvalidInput(f"export directory must be an absolute path: {directory}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInput(f"export directory {target} is not empty; parvisor exports "
                           "only into a new or empty directory", path=str(target))
    if not target.parent.is_dir():
        raise InvalidInput(f"{target.parent} does not exist", path=str(target))
    return target


def write_export(definition: VmDefinition, target: Path, report: Any) -> dict[str, Any]:
    """Write the whole export; on any failure remove what was written."""
    created = not target.exists()
    target.mkdir(exist_ok=True)
    try:
        data, files = _export_files(definition, target, report)
        manifest = {"format": FORMAT_NAME, "format_version": EXPORT_VERSION,
                    "exported_at": time.time(), "parvisor_version": __version__,
                    "definition": data, "files": files}
        partial = target / f".{MANIFEST}.partial"
        partial.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(partial, target / MANIFEST)        # last: marks the export complete
        return {"directory": str(target), "files": sorted(files), "vm": definition.name}
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in target.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _export_files(definition: VmDefinition, target: Path,
                  report: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    data = definition.model_dump(mode="json")
    files: dict[str, Any] = {}
    (target / "disks").mkdir()
    disks = []
    for index, disk in enumerate(definition.disks):
        report(0.05 + 0.85 * index / max(1, len(definition.disks)), f"disk {disk.id}")
        spec = disk.model_dump(mode="json")
        if disk.path and disk.media == "disk":
            name = f"disks/{disk.id}.qcow2"     # flattened: chain and snapshots dropped
            convert_image(Path(disk.path), disk.format, target / name, "qcow2")
            spec.update(path=name, format="qcow2", readonly=False)
        elif disk.path and disk.owned:          # the VM's own CD media (seed)
            name = f"disks/{disk.id}-{Path(disk.path).name}"
            shutil.copyfile(disk.path, target / name)
            spec["path"] = name
        else:
            spec["path"] = None                 # a user's ISO stays on this host
        disks.append({**spec, "owned": True})
    data["disks"] = disks
    if data["boot"]["kind"] == "kernel":
        (target / "boot").mkdir()
        for key in ("kernel", "initrd"):
            if data["boot"].get(key):
                shutil.copyfile(data["boot"][key], target / "boot" / key)
                data["boot"][key] = f"boot/{key}"
    for name in referenced_files(data):
        files[name] = {"size": (target / name).stat().st_size,
                       "sha256": sha256_of(target / name)}
    return data, files


# --- import -----------------------------------------------------------------------------
def read_export(directory: str) -> tuple[Path, Manifest]:
    source = Path(directory)
    if not source.is_absolute() or not source.is_dir():
        raise InvalidInput(f"{directory} is not an absolute path to a directory")
    source = source.resolve()
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise InvalidInput(f"{source} has no {MANIFEST}: not a parvisor export (or an "
                           "unfinished one)", path=str(source))
    manifest = parse_manifest(manifest_path.read_bytes())
    missing = [n for n in referenced_files(manifest.definition) if n not in manifest.files]
    if missing:
        raise InvalidInput(f"export manifest does not list {missing}", files=missing)
    return source, manifest


def verify_files(source: Path, manifest: Manifest, report: Any) -> None:
    """Sizes and sha256 as recorded; disks: qcow2 without parent, not damaged."""
    disks = {d["path"] for d in manifest.definition.get("disks", [])
             if d.get("path") and d.get("media", "disk") == "disk"}
    for index, (name, entry) in enumerate(sorted(manifest.files.items())):
        report(0.05 + 0.4 * index / max(1, len(manifest.files)), f"checking {name}")
        path = source / safe_relative(name)
        if path.is_symlink() or not path.is_file() or \
                not path.resolve().is_relative_to(source):
            raise InvalidInput(f"export file {name} is missing or not a plain file")
        if path.stat().st_size != entry.size or sha256_of(path) != entry.sha256:
            raise InvalidInput(f"export file {name} does not match its recorded size and "
                               "sha256: the export is damaged or was changed", file=name)
        if name in disks:
            _check_disk(path, name)


def _check_disk(path: Path, name: str) -> None:
    try:
        info = inspect_image(path, "qcow2")
    except StorageError as exc:
        raise InvalidInput(f"export disk {name} is not a readable qcow2 image") from exc
    if info.backing_file:
        raise InvalidInput(f"export disk {name} names a backing file "
                           f"({info.backing_file!r}); exports are flattened", file=name)
    refuse_damaged(path, "qcow2")


class ExportManager:
    def __init__(self, vms: Any) -> None:
        self.vms = vms
        self.store = vms.store
        self.roots = tuple(vms.config.storage_roots)

    def export(self, name: str, request: ExportVm) -> Job:
        record = self.store.get_vm(name)
        if record.state not in EXPORT_STATES:
            raise StateError("export", record.state.value, [s.value for s in EXPORT_STATES],
                             vm=name)
        refuse_shared_disks("export", record.definition)
        target = check_export_dir(request.directory)
        runtime = self.vms.runtime(record.uuid)
        if runtime.lock.locked():
            raise Busy(f"VM '{name}' is busy: {runtime.operation} in progress", vm=name)

        async def work(job: Job) -> Any:
            async with runtime.exclusive("export", name):
                current = self.store.get_vm(name)
                if current.state not in EXPORT_STATES:
                    raise StateError("export", current.state.value,
                                     [s.value for s in EXPORT_STATES], vm=name)
                check_export_dir(request.directory)
                result = await asyncio.to_thread(write_export, current.definition, target,
                                                 job.report)
            self.vms.event("exported", f"{name}: exported to {target}", current,
                           directory=str(target))
            return result
        return self.vms.jobs.start("export", work, vm_name=name)

    def import_(self, request: ImportExport) -> Job:
        if request.mode == "in-place":    # first: the files would become the VM's own
            resolve_in_roots(request.directory, self.roots,
                             what="export directory (--in-place)")
        source, manifest = read_export(request.directory)
        data = self._definition(manifest, request)         # all refusals before the job

        async def work(job: Job) -> Any:
            await asyncio.to_thread(verify_files, source, manifest, job.report)
            record = await asyncio.to_thread(self._register, source, data, request, job)
            self.vms.event("created", f"{record.name}: imported from {source} "
                           f"({request.mode})", record, directory=str(source))
            return self.vms.show(record.name).model_dump(mode="json")
        return self.vms.jobs.start("vm-import", work, vm_name=data["name"])

    def _definition(self, manifest: Manifest, request: ImportExport) -> dict[str, Any]:
        try:
            data = upgrade_definition(dict(manifest.definition))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"exported definition: {exc}") from exc
        name = request.name or str(data.get("name"))
        _refuse_existing_name(self.store, name)
        in_use = macs_in_use(r.definition for r in self.store.list_vms())
        if request.mode == "copy":
            data = fresh_identity(data, name, in_use)
        else:
            self._check_in_place_identity(data, in_use)
            data = {**data, "name": name, "template": False}
        for nic in data.get("nics", []):
            self._check_switch(nic.get("switch"))
        _validated(data)              # refuse a malformed definition before any copy
        return data

    def _check_in_place_identity(self, data: dict[str, Any], in_use: set[str]) -> None:
        with contextlib.suppress(NotFound):
            other = self.store.get_vm_by_uuid(str(data.get("uuid")))
            raise AlreadyExists(f"VM '{other.name}' already has the exported uuid; import "
                                "with --copy to get a new one", uuid=other.uuid)
        for nic in data.get("nics", []):
            validate_mac(str(nic.get("mac")), in_use)

    def _check_switch(self, switch: Any) -> None:
        if self.vms.switches is None:
            raise InvalidInput("this host has no switch manager: NICs are not available")
        try:
            self.vms.switches.get(switch)
        except NotFound:
            raise InvalidInput(f"the export's NIC uses switch '{switch}', which does not "
                               "exist here; create it first", switch=switch) from None

    def _register(self, source: Path, data: dict[str, Any], request: ImportExport,
                  job: Job) -> Any:
        with placed_files(self.roots) as placed:
            if request.mode == "copy":
                folder = vm_disk_dir(self.roots, data["uuid"])
                resolve = lambda name: placed.place(   # noqa: E731
                    folder / Path(name).name, lambda t: copy_file(source / name, t))
            else:
                resolve = lambda name: source / name   # noqa: E731
            job.report(0.5, "placing files")
            disks = [{**d, "path": str(resolve(d["path"])) if d.get("path") else None}
                     for d in data.get("disks", [])]
            boot = dict(data["boot"])
            for key in ("kernel", "initrd"):
                if boot.get(key):
                    boot[key] = str(resolve(boot[key]))
            definition = _validated({**data, "disks": disks, "boot": boot})
            return self.store.create_vm(definition)


def _validated(data: dict[str, Any]) -> VmDefinition:
    from parvisor.ops.vms import validated_definition
    return validated_definition(data)


def _refuse_existing_name(store: Any, name: str) -> None:
    try:
        store.get_vm(name)
    except NotFound:
        return
    raise AlreadyExists(f"a VM named '{name}' already exists (use --name NEW)", name=name)
