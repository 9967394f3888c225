"""Preparing an import: from a .vmc, an OVF/OVA or a bare disk to a checked plan.

What for: everything that can refuse an import is decided here, before any byte is
converted, so the API answers 400 at once (the .vmc names a missing disk, a VHD footer
is corrupt, a parent leaves the allowed roots, an OVA member name escapes its folder, a
switch does not exist, a kept MAC is already used on this host, the name is taken).
The result, ``PreparedImport``, holds the complete VM definition (final disk paths
included) and per disk a ``locate`` step that yields the validated source.

Allowed roots for an import's sources and their parents: the folder of the file given
(the .vmc, .ovf or disk) plus the storage roots; an OVA's files are validated after
extraction into the job's staging folder (under the first storage root).

What never: no file is written here (``open_ova`` only lists), no store write; the
conversion, staging and registration are ``parvisor.ops.imports``.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.importers.convert import SourceDisk, sniff_format, validate_source, vhd_source
from parvisor.importers.ovf import OvfDescriptor, extract_ova, load_ovf, open_ova
from parvisor.importers.vmc import Attention, ImportPlan, parse_vmc, plan_vmc_import
from parvisor.model.vm import DiskBoot, DiskSpec, VmDefinition
from parvisor.ops.disks import vm_disk_dir
from parvisor.ops.import_requests import ImportDisk, ImportOvf, ImportVmc
from parvisor.ops.nics import macs_in_use, nic_specs
from parvisor.ops.requests import NicRequest
from parvisor.ops.vms import validated_definition
from parvisor.storage.disks import new_file_target
from parvisor.storage.roots import resolve_in_roots
from parvisor.switch import allocate_mac, validate_mac

OVA_DIR = "ova"                     # an OVA's files inside the job's staging folder
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")
Locate = Callable[[Path], SourceDisk]      # staging folder -> validated source


@dataclass(frozen=True)
class DiskWork:
    id: str
    target: Path                     # final qcow2 path (does not exist yet)
    locate: Locate
    label: str                       # what the progress bar says


@dataclass
class PreparedImport:
    kind: str                        # vmc | disk | ovf
    source: Path
    definition: VmDefinition
    disks: list[DiskWork]
    attention: list[dict[str, str]] = field(default_factory=list)
    stage: Callable[[Path], None] | None = None   # e.g. extract an OVA into staging


@dataclass(frozen=True)
class HostView:
    """What preparing needs from the host: config roots, the store, the switches."""

    roots: tuple[Path, ...]
    store: Any
    switches: Any

    def taken_macs(self) -> set[str]:
        return macs_in_use(r.definition for r in self.store.list_vms())


# --- shared checks --------------------------------------------------------------------------
def source_file(path: str, what: str) -> Path:
    """A user-given source: absolute, an existing regular file (anywhere readable)."""
    raw = Path(path)
    if not raw.is_absolute():
        raise InvalidInput(f"{what} path must be absolute: {path}", path=path)
    if not raw.is_file():
        raise InvalidInput(f"{what} {path} does not exist or is not a file", path=path)
    return raw.resolve()


def import_roots(host: HostView, folder: Path) -> tuple[Path, ...]:
    return (folder, *host.roots)


def vm_disk_target(host: HostView, vm_uuid: str, disk_id: str) -> Path:
    """The VM's own disk folder, as for every disk parvisor makes (ops.disks)."""
    return new_file_target(vm_disk_dir(host.roots, vm_uuid) / f"{disk_id}.qcow2", host.roots)


def check_new_vm(host: HostView, definition: VmDefinition) -> None:
    try:
        host.store.get_vm(definition.name)
    except NotFound:
        pass
    else:
        raise AlreadyExists(f"a VM named '{definition.name}' already exists (choose "
                            "another with --name)", name=definition.name)
    check_uuid_free(host, definition.uuid)


def check_uuid_free(host: HostView, vm_uuid: str) -> None:
    try:
        other = host.store.get_vm_by_uuid(vm_uuid)
    except NotFound:
        return
    raise AlreadyExists(f"VM '{other.name}' already has UUID {vm_uuid} (the same "
                        "machine imported twice?)", uuid=vm_uuid, vm=other.name)


def check_switch(host: HostView, switch: str, network: str) -> None:
    if host.switches is None:
        raise InvalidInput("this host has no switch manager: NICs cannot be imported")
    try:
        host.switches.get(switch)
    except NotFound:
        raise InvalidInput(f"network '{network}' maps to switch '{switch}', which does not "
                           f"exist: create it or map the network (--switch SW or --switch "
                           f"'{network}=SW')", switch=switch, network=network) from None


def sanitize_name(text: str) -> str:
    return _NAME_BAD.sub("-", text).strip("-._")[:63] or "imported-vm"


def fixed(source: SourceDisk) -> Locate:
    return lambda _staging: source


def owned_disks(definition: VmDefinition, ids: set[str]) -> VmDefinition:
    """Mark the converted disks as the VM's own (deleted with it)."""
    data = definition.model_dump()
    for disk in data["disks"]:
        disk["owned"] = disk["id"] in ids
    return validated_definition(data)


# --- .vmc --------------------------------------------------------------------------------------
def prepare_vmc(host: HostView, request: ImportVmc) -> PreparedImport:
    vmc = source_file(request.path, ".vmc file")
    plan = plan_vmc_import(parse_vmc(vmc), vmc.parent, name=request.name,
                           switch_map=request.switches, undo=request.undo,
                           saved_state=request.saved_state,
                           skip_missing=request.skip_missing)
    plan = _cds_inside_roots(plan, host.roots)
    # The BIOS GUID becomes the VM's uuid; without one, pick it now: disks live under it.
    plan = dataclasses.replace(plan, uuid=plan.uuid or str(uuid.uuid4()))
    check_uuid_free(host, plan.uuid)          # before its disk folder is looked at
    roots = import_roots(host, vmc.parent)
    sources = {d.id: vhd_source(d.source, roots) for d in plan.disks}
    targets = {d.id: vm_disk_target(host, plan.uuid, d.id) for d in plan.disks}
    for nic in plan.nics:
        check_switch(host, nic.switch, nic.network_name)
    definition = owned_disks(plan.to_vm_definition(targets, mac_for=_mac_source(host, plan)),
                             set(targets))
    check_new_vm(host, definition)
    attention = [dataclasses.asdict(a) for a in plan.attention]
    attention += [{"code": "vhd-warning", "message": w}
                  for s in sources.values() for w in s.warnings]
    disks = [DiskWork(d.id, targets[d.id], fixed(sources[d.id]),
                      f"{d.id} ({d.original}, {d.source.name})") for d in plan.disks]
    return PreparedImport("vmc", vmc, definition, disks, attention)


def _mac_source(host: HostView, plan: ImportPlan) -> Callable[[str], str]:
    """Kept MACs are validated against the host; dynamic ones get a parvisor MAC."""
    taken = host.taken_macs()
    for nic in plan.nics:
        if nic.mac:
            taken.add(validate_mac(nic.mac, taken))

    def allocate(_nic_id: str) -> str:
        mac = allocate_mac(taken)
        taken.add(mac)
        return mac
    return allocate


def _cds_inside_roots(plan: ImportPlan, roots: tuple[Path, ...]) -> ImportPlan:
    """VMs may only use ISOs inside the storage roots: others are attached empty."""
    cds, notes = [], list(plan.attention)
    for cd in plan.cds:
        if cd.image is not None:
            try:
                resolve_in_roots(cd.image.absolute(), roots, what="ISO")
            except InvalidInput:
                notes.append(Attention("cd-outside-roots", f"CD/DVD image {cd.image} "
                                       f"({cd.original}) is outside the storage roots: the "
                                       "drive is attached empty (copy the ISO into a "
                                       "storage root and insert it)."))
                cd = dataclasses.replace(cd, image=None)
        cds.append(cd)
    return dataclasses.replace(plan, cds=tuple(cds), attention=tuple(notes))


# --- P2V: a bare disk -------------------------------------------------------------------------
def prepare_disk(host: HostView, request: ImportDisk) -> PreparedImport:
    path = source_file(request.path, "disk")
    fmt = request.format or sniff_format(path)
    attention = [] if request.format else [{"code": "format-detected", "message":
                                            f"{path.name} was read as {fmt} (pass --format "
                                            "to override)."}]
    source = validate_source(path, fmt, import_roots(host, path.parent))
    vm_uuid = str(uuid.uuid4())
    target = vm_disk_target(host, vm_uuid, "disk0")
    nics = nic_specs(request.nics, host.switches, host.taken_macs()) if request.nics else []
    definition = validated_definition({
        "name": request.name, "uuid": vm_uuid, "vcpus": request.vcpus,
        "memory_bytes": request.memory,
        "os_type": request.os_type, "boot": DiskBoot(), "nics": nics,
        "notes": f"Imported from {path}",
        "disks": [DiskSpec(id="disk0", path=str(target), format="qcow2", bus=request.bus,
                           owned=True)]})
    check_new_vm(host, definition)
    work = DiskWork("disk0", target, fixed(source), f"disk0 ({path.name})")
    return PreparedImport("disk", path, definition, [work], attention)


# --- OVF / OVA ---------------------------------------------------------------------------------
def prepare_ovf(host: HostView, request: ImportOvf) -> PreparedImport:
    path = source_file(request.path, "OVF/OVA file")
    if path.suffix.lower() == ".ova":
        descriptor = open_ova(path).descriptor          # lists and checks, writes nothing
        stage: Callable[[Path], None] | None = lambda staging: _extract(path, staging)
        folder: Path | None = None
    else:
        package = load_ovf(path)
        descriptor, stage, folder = package.descriptor, None, path.parent
    name = request.name or sanitize_name(descriptor.name)
    vm_uuid = str(uuid.uuid4())
    targets = {f"disk{i}": vm_disk_target(host, vm_uuid, f"disk{i}")
               for i in range(len(descriptor.disks))}
    definition = _ovf_definition(host, descriptor, name, vm_uuid, targets, request.switches)
    check_new_vm(host, definition)
    disks = []
    for index, disk in enumerate(descriptor.disks):
        locate = _ovf_locate(host, disk.href, disk.qemu_format, disk.capacity_bytes, folder)
        if folder is not None:
            locate = fixed(locate(folder))            # a folder: validate now (400 at once)
        disks.append(DiskWork(f"disk{index}", targets[f"disk{index}"], locate,
                              f"disk{index} ({disk.href})"))
    return PreparedImport("ovf", path, definition, disks, _ovf_attention(descriptor), stage)


def _extract(ova: Path, staging: Path) -> None:
    folder = staging / OVA_DIR
    folder.mkdir()
    extract_ova(ova, folder)                             # manifest digests checked here


def _ovf_locate(host: HostView, href: str, fmt: str, capacity: int,
                folder: Path | None) -> Locate:
    def locate(where: Path) -> SourceDisk:
        base = folder if folder is not None else where / OVA_DIR
        source = validate_source(base / href, fmt, import_roots(host, base))
        if source.virtual_size != capacity:
            raise InvalidInput(f"OVF disk {href}: the descriptor says {capacity} bytes, the "
                               f"file holds {source.virtual_size}", path=str(base / href),
                               expected=capacity, got=source.virtual_size)
        return source
    return locate


def _ovf_definition(host: HostView, descriptor: OvfDescriptor, name: str, vm_uuid: str,
                    targets: dict[str, Path], switch_map: dict[str, str]) -> VmDefinition:
    disks = [DiskSpec(id=disk_id, path=str(targets[disk_id]), format="qcow2",
                      bus=disk.bus, owned=True)
             for disk_id, disk in zip(targets, descriptor.disks)]
    disks += [DiskSpec(id=f"cd{i}", path=None, format="raw", bus="ahci", media="cdrom",
                       readonly=True) for i in range(descriptor.cd_drives)]
    requests = []
    for nic in descriptor.nics:
        switch = switch_map.get(nic.network) or switch_map.get("*") or nic.network
        check_switch(host, switch, nic.network)
        model = "e1000" if nic.model.upper().startswith("E1000") else "virtio"
        requests.append(NicRequest(switch=switch, mac=nic.mac, model=model))
    nics = nic_specs(requests, host.switches, host.taken_macs()) if requests else []
    return validated_definition({
        "name": name, "uuid": vm_uuid, "vcpus": descriptor.vcpus,
        "memory_bytes": descriptor.memory_bytes,
        "boot": DiskBoot(), "disks": disks, "nics": nics,
        "notes": f"Imported from {descriptor.source}"[:4096]})


def _ovf_attention(descriptor: OvfDescriptor) -> list[dict[str, str]]:
    notes = []
    for nic in descriptor.nics:
        if nic.model and not nic.model.upper().startswith("E1000"):
            notes.append({"code": "nic-model", "message": f"NIC '{nic.network}' was "
                          f"{nic.model}; it is virtio now: the guest needs virtio-net."})
    if descriptor.cd_drives:
        notes.append({"code": "cd-empty", "message": f"{descriptor.cd_drives} CD/DVD "
                      "drive(s) attached empty."})
    if any(d.bus == "virtio-scsi" for d in descriptor.disks):
        notes.append({"code": "scsi-to-virtio", "message": "SCSI disks sit on virtio-scsi: "
                      "the guest needs its driver to boot from them."})
    return notes
