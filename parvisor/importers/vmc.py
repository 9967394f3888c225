"""Virtual Server 2005 / Virtual PC ``.vmc`` files: safe parsing and a pure import plan.

What for: ``parvisor import vmc`` reads a .vmc (UTF-16 XML with BOM, root
``<preferences>``), then decides — without touching anything — which disks to convert,
which CDs and NICs to attach, and what the user must fix inside the guest.

What never: no entity expansion, no DTD, no file over ``MAX_VMC_BYTES``, no tree deeper
than ``MAX_DEPTH``; ``plan_vmc_import`` does no I/O (existence checks come in through
``exists``), and it never half-decides: a missing disk, pending undo disks or a saved
state refuse the whole plan with ``InvalidInput`` unless an option says what to do.

Public API (called by the wiring)::

    parse_vmc(path) -> VmcConfig                 # parse_vmc_bytes(data, source=...)
    plan_vmc_import(parsed, vmc_dir, *, name=None, switch_map={}, undo=None,
                    saved_state=None, skip_missing=False, exists=Path.is_file) -> ImportPlan
    plan.to_vm_definition(converted: Mapping[disk id, qcow2 path]) -> VmDefinition

BIOS GUID → SMBIOS UUID: Virtual PC stores ``bios_guid`` as Windows GUID text
(``{8CFA867F-F796-...}``); the guest sees that text (``wmic csproduct get uuid``) because
Windows decodes SMBIOS ≥ 2.6 UUIDs with the first three fields little-endian. QEMU's
``-uuid``/``-smbios type=1,uuid=`` takes the same canonical text and writes those fields
little-endian (``qemu_uuid_bswap`` in hw/smbios), so the text is kept *as is* (lower-cased,
braces dropped) and the guest sees an unchanged UUID — which keeps Windows activation and
licensing stable. A ``type="bytes"`` GUID is raw GUID memory (fields little-endian) and is
decoded with ``uuid.UUID(bytes_le=...)`` to the same text form.
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuid_mod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PureWindowsPath
from typing import Callable, Literal, Mapping
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from parvisor.errors import InvalidInput

MAX_VMC_BYTES = 4 << 20          # real files are ~12 KiB; anything larger is not a .vmc
MAX_DEPTH = 32                   # real files nest 8 deep
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


class DriveKind(str, Enum):
    NONE = "none"
    HARD_DISK = "hard-disk"
    CD_DVD_IMAGE = "cd-dvd-image"
    HOST_DRIVE = "host-drive"           # a physical CD drive of the old host


@dataclass(frozen=True)
class VmcPath:
    absolute: str = ""
    relative: str = ""

    @property
    def empty(self) -> bool:
        return not (self.absolute or self.relative)


@dataclass(frozen=True)
class VmcDrive:
    controller: Literal["ide", "scsi"]
    bus: int                      # IDE: controller 0/1; SCSI: adapter number
    unit: int                     # IDE: location 0/1 (master/slave); SCSI: id
    kind: DriveKind
    path: VmcPath
    undo_path: VmcPath = VmcPath()

    @property
    def where(self) -> str:
        return f"{self.controller.upper()} {self.bus}:{self.unit}"


@dataclass(frozen=True)
class VmcNic:
    index: int
    enabled: bool                 # index < controller_count
    mac: str | None               # aa:bb:cc:dd:ee:ff; None: dynamic (all zero) or absent
    network_name: str


@dataclass(frozen=True)
class VmcConfig:
    source: str
    default_name: str
    creator: str
    memory_mib: int
    drives: tuple[VmcDrive, ...]
    nics: tuple[VmcNic, ...]
    smbios_uuid: str | None
    undo_disks_enabled: bool
    saved_state: VmcPath
    additions_version: str | None
    not_understood: tuple[str, ...] = ()

    @property
    def additions_installed(self) -> bool:
        return self.additions_version is not None

    @property
    def has_saved_state(self) -> bool:
        return not self.saved_state.empty


# --- reading ---------------------------------------------------------------------------
def _bad(source: str, problem: str, **details) -> InvalidInput:
    return InvalidInput(f".vmc {source}: {problem}", path=source, **details)


def decode_vmc(data: bytes, source: str) -> str:
    """UTF-16 with BOM (what Virtual PC writes), UTF-8 (hand-edited) — nothing else."""
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        encoding = "utf-16"
    elif data.startswith(b"<\0"):
        encoding = "utf-16-le"          # BOM lost in a copy
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise _bad(source, f"not UTF-16 or UTF-8 text ({encoding} fails at byte "
                   f"{exc.start}): save it as Unicode", field="encoding") from exc
    # ElementTree would honour the declaration's encoding on bytes only; we hand it text.
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", text, count=1)


def _depth(root: Element) -> int:
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node)
    return deepest


def parse_vmc_bytes(data: bytes, *, source: str = "<memory>") -> VmcConfig:
    if len(data) > MAX_VMC_BYTES:
        raise _bad(source, f"{len(data)} bytes is over the {MAX_VMC_BYTES} byte limit",
                   field="size")
    text = decode_vmc(data, source)
    try:
        root = SafeET.fromstring(text, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=True)
    except DefusedXmlException as exc:
        raise _bad(source, f"forbidden XML construct ({type(exc).__name__}): a .vmc has "
                   "no DTD or entities", field="xml") from exc
    except ParseError as exc:
        raise _bad(source, f"malformed or truncated XML ({exc})", field="xml") from exc
    if root.tag != "preferences":
        raise _bad(source, f"root element is <{root.tag}>, not <preferences>", field="root")
    if _depth(root) > MAX_DEPTH:
        raise _bad(source, f"XML nests deeper than {MAX_DEPTH} levels", field="xml")
    return _config(root, source)


def parse_vmc(path: str | Path) -> VmcConfig:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_VMC_BYTES + 1)      # never read a huge file whole
    except OSError as exc:
        raise _bad(str(path), f"cannot read: {exc.strerror}") from exc
    config = parse_vmc_bytes(data, source=str(path))
    return _with_name(config, _sanitize_name(path.stem))


def _with_name(config: VmcConfig, name: str) -> VmcConfig:
    return dataclasses.replace(config, default_name=name)


def _sanitize_name(stem: str) -> str:
    name = _NAME_BAD.sub("-", stem).strip("-._")[:63]
    return name or "imported-vm"


# --- typed leaves ------------------------------------------------------------------------
def _text(node: Element | None, path: str) -> str:
    found = node.find(path) if node is not None else None
    return (found.text or "").strip() if found is not None else ""


def _int(node: Element | None, path: str, source: str, default: int = 0) -> int:
    raw = _text(node, path)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise _bad(source, f"{path}: '{raw}' is not an integer", field=path) from None


def _bool(node: Element | None, path: str) -> bool:
    return _text(node, path).lower() == "true"


def _vmc_path(node: Element | None, tag: str) -> VmcPath:
    return VmcPath(_text(node, f"{tag}/absolute"), _text(node, f"{tag}/relative"))


def normalize_mac(raw: str, source: str) -> str | None:
    hexdigits = re.sub(r"[^0-9A-Fa-f]", "", raw)
    if not raw:
        return None
    if len(hexdigits) != 12 or len(re.sub(r"[-:.\s]", "", raw)) != 12:
        raise _bad(source, f"ethernet_card_address '{raw}' is not a MAC address",
                   field="ethernet_card_address")
    if int(hexdigits, 16) == 0:
        return None                          # Virtual PC: "generate one at start"
    mac = ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2)).lower()
    if int(mac[:2], 16) & 1:
        raise _bad(source, f"ethernet_card_address {mac} is a multicast address",
                   field="ethernet_card_address")
    return mac


def smbios_uuid(node: Element | None, source: str) -> str | None:
    found = node.find("bios_guid") if node is not None else None
    raw = (found.text or "").strip() if found is not None else ""
    if not raw:
        return None
    try:
        if found.get("type") == "bytes":
            return str(uuid_mod.UUID(bytes_le=bytes.fromhex(raw)))
        return str(uuid_mod.UUID(raw.strip("{}")))
    except ValueError:
        raise _bad(source, f"bios_guid '{raw}' is not a GUID", field="bios_guid") from None


# --- sections --------------------------------------------------------------------------
def _drive_kind(loc: Element, path: VmcPath, source: str) -> DriveKind:
    code = _int(loc, "drive_type", source)
    if code == 1:
        return DriveKind.HARD_DISK
    if code == 2:
        target = path.absolute or path.relative
        # A bare drive letter ("D:") is the old host's physical drive, not an image.
        if re.fullmatch(r"[A-Za-z]:\\?", target) or loc.find("host_drive") is not None:
            return DriveKind.HOST_DRIVE
        return DriveKind.CD_DVD_IMAGE
    return DriveKind.NONE


def _locations(controller: Element, kind: Literal["ide", "scsi"], bus: int,
               source: str) -> list[VmcDrive]:
    drives = []
    for loc in controller.findall("location"):
        unit = int(loc.get("id", "0")) if loc.get("id", "0").isdigit() else 0
        path = _vmc_path(loc, "pathname")
        drive = VmcDrive(kind, bus, unit, _drive_kind(loc, path, source), path,
                         _vmc_path(loc, "undo_pathname"))
        if drive.kind is not DriveKind.NONE:
            drives.append(drive)
    return drives


def _drives(pci: Element | None, source: str) -> tuple[list[VmcDrive], list[str]]:
    drives: list[VmcDrive] = []
    unknown: list[str] = []
    if pci is None:
        return drives, unknown
    for ctrl in pci.findall("ide_adapter/ide_controller"):
        drives += _locations(ctrl, "ide", int(ctrl.get("id", "0") or 0), source)
    # Virtual Server's SCSI element names are not confirmed from a real file: accept any
    # *scsi* adapter with id'd controllers holding <location>s, report anything else.
    for adapter in (el for el in pci if "scsi" in el.tag):
        controllers = [el for el in adapter if el.get("id") is not None]
        for number, ctrl in enumerate(controllers):
            found = _locations(ctrl, "scsi", int(ctrl.get("id") or number), source)
            drives += found
            if not found and ctrl.find("location") is None:
                unknown.append(f"pci_bus/{adapter.tag}/{ctrl.tag}")
        if not controllers:
            unknown.append(f"pci_bus/{adapter.tag}")
    drives.sort(key=lambda d: (d.controller, d.bus, d.unit))
    return drives, unknown


def _nics(pci: Element | None, source: str) -> tuple[VmcNic, ...]:
    adapter = pci.find("ethernet_adapter") if pci is not None else None
    if adapter is None:
        return ()
    count = _int(adapter, "controller_count", source)
    nics = []
    for position, ctrl in enumerate(adapter.findall("ethernet_controller")):
        index = int(ctrl.get("id")) if (ctrl.get("id") or "").isdigit() else position
        nics.append(VmcNic(index=index, enabled=index < count,
                           mac=normalize_mac(_text(ctrl, "ethernet_card_address"), source),
                           network_name=_text(ctrl, "virtual_network/name")))
    return tuple(sorted(nics, key=lambda n: n.index))


def _config(root: Element, source: str) -> VmcConfig:
    hardware = root.find("hardware")
    pci = hardware.find("pci_bus") if hardware is not None else None
    memory = _int(root, "hardware/memory/ram_size", source, default=-1)
    if memory <= 0:
        raise _bad(source, "hardware/memory/ram_size is missing or not positive",
                   field="ram_size")
    drives, unknown = _drives(pci, source)
    additions = _text(root, "integration/microsoft/version/additions_number")
    return VmcConfig(
        source=source, default_name="imported-vm",
        creator=_text(root, "properties/creator/name"), memory_mib=memory,
        drives=tuple(drives), nics=_nics(pci, source),
        smbios_uuid=smbios_uuid(hardware.find("bios") if hardware is not None else None,
                                source),
        undo_disks_enabled=_bool(root, "settings/undo_drives/enabled"),
        saved_state=_vmc_path(root.find("settings/configuration/saved_state"), "path"),
        additions_version=additions or None, not_understood=tuple(unknown))


# --- planning (pure) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Attention:
    """Something the report must show: what to do, mostly inside the guest."""

    code: str        # remove-additions, scsi-boot-to-ide, skipped-disk, ...
    message: str


@dataclass(frozen=True)
class DiskToConvert:
    id: str
    source: Path                  # the VHD to convert (top of its chain)
    found_by: Literal["relative", "absolute", "bare-name"]
    original: str                 # "IDE 0:0"
    bus: Literal["ide", "ahci"]


@dataclass(frozen=True)
class CdToAttach:
    id: str
    image: Path | None            # None: an empty drive
    original: str


@dataclass(frozen=True)
class NicToCreate:
    id: str
    mac: str | None               # None: the wiring generates one
    switch: str
    network_name: str
    model: Literal["e1000"] = "e1000"


@dataclass(frozen=True)
class ImportPlan:
    name: str
    uuid: str | None
    memory_bytes: int
    disks: tuple[DiskToConvert, ...]
    cds: tuple[CdToAttach, ...]
    nics: tuple[NicToCreate, ...]
    attention: tuple[Attention, ...] = field(default=())

    def to_vm_definition(self, converted: Mapping[str, str | Path], *,
                         mac_for: Callable[[str], str] | None = None):
        """The VM definition once every disk id has its converted qcow2 path.

        ``mac_for(nic_id)`` supplies a MAC for adapters Virtual PC left dynamic.
        """
        from parvisor.model.vm import DiskBoot, DiskSpec, NicSpec, VmDefinition
        missing_mac = [n.id for n in self.nics if not n.mac]
        if missing_mac and mac_for is None:
            raise InvalidInput(f"NICs {missing_mac} have no MAC: pass mac_for",
                               nics=missing_mac)
        disks = [DiskSpec(id=d.id, path=str(converted[d.id]), format="qcow2", bus=d.bus)
                 for d in self.disks]
        disks += [DiskSpec(id=c.id, path=str(c.image) if c.image else None, format="raw",
                           bus="ide", media="cdrom", readonly=True) for c in self.cds]
        data = dict(name=self.name, memory_bytes=self.memory_bytes, boot=DiskBoot(),
                    disks=tuple(disks), os_type="windows", notes=self.notes(),
                    nics=tuple(NicSpec(id=n.id, switch=n.switch, model=n.model,
                                       mac=n.mac or mac_for(n.id))  # type: ignore[misc]
                               for n in self.nics))
        if self.uuid:
            data["uuid"] = self.uuid
        return VmDefinition.model_validate(data)

    def notes(self) -> str:
        return "\n".join(f"- {a.message}" for a in self.attention)[:4096]


UndoChoice = Literal["commit", "discard"]


def resolve_vmc_path(ref: VmcPath, vmc_dir: Path, exists: Callable[[Path], bool]
                     ) -> tuple[Path, str] | None:
    """``relative`` against the .vmc folder, then ``absolute``, then the bare name."""
    candidates: list[tuple[Path, str]] = []
    rel = PureWindowsPath(ref.relative)
    if ref.relative and not rel.drive and not rel.root:
        candidates.append((vmc_dir.joinpath(*[p for p in rel.parts if p != "."]),
                           "relative"))
    if ref.absolute.startswith("/"):          # a POSIX path (hand-edited on Linux)
        candidates.append((Path(ref.absolute), "absolute"))
    elif ref.absolute and PureWindowsPath(ref.absolute).drive:
        # "C:\VMs\x.vhd" cannot exist here; only its bare name is worth a try.
        pass
    for raw in (ref.absolute, ref.relative):
        name = PureWindowsPath(raw).name if raw else ""
        if name:
            candidates.append((vmc_dir / name, "bare-name"))
    for path, how in candidates:
        if exists(path):
            return path, how
    return None


def _shown(ref: VmcPath) -> str:
    return ref.relative or ref.absolute


def _check_state(parsed: VmcConfig, undo: UndoChoice | None,
                 saved_state: Literal["discard"] | None, notes: list[Attention]) -> None:
    src = parsed.source
    if parsed.has_saved_state:
        if saved_state != "discard":
            raise _bad(src, f"the VM has a saved state ({_shown(parsed.saved_state)}) that "
                       "QEMU cannot resume: shut it down in Virtual PC/Server first, or "
                       "import it as turned off (--saved-state discard)", field="saved_state")
        notes.append(Attention("saved-state-discarded", "The saved state was discarded: "
                               "the guest boots as after a power failure (chkdsk may run)."))
    pending = [d for d in parsed.drives if not d.undo_path.empty]
    if pending and undo is None:
        where = ", ".join(f"{d.where} ({_shown(d.undo_path)})" for d in pending)
        raise _bad(src, f"undo disks hold uncommitted changes on {where}: choose "
                   "--undo commit (keep them) or --undo discard (drop them)",
                   field="undo_pathname")
    if parsed.undo_disks_enabled and not pending:
        notes.append(Attention("undo-disks", "Undo disks were enabled; parvisor has none: "
                               "use checkpoints instead."))


def _disk_source(drive: VmcDrive, vmc_dir: Path, undo: UndoChoice | None,
                 exists: Callable[[Path], bool], source: str) -> tuple[Path, str] | None:
    if undo == "commit" and not drive.undo_path.empty:
        # The .vud is a differencing VHD over the disk: converting its chain commits it.
        found = resolve_vmc_path(drive.undo_path, vmc_dir, exists)
        if found is None:
            raise _bad(source, f"undo disk {_shown(drive.undo_path)} of {drive.where} not "
                       f"found (looked in {vmc_dir})", field="undo_pathname")
        return found
    return resolve_vmc_path(drive.path, vmc_dir, exists)


def _plan_disks(parsed: VmcConfig, vmc_dir: Path, undo: UndoChoice | None,
                skip_missing: bool, exists: Callable[[Path], bool],
                notes: list[Attention]) -> tuple[DiskToConvert, ...]:
    hard = [d for d in parsed.drives if d.kind is DriveKind.HARD_DISK]
    ide_used = sum(1 for d in parsed.drives if d.controller == "ide")
    disks: list[DiskToConvert] = []
    for drive in sorted(hard, key=lambda d: d.controller != "ide"):   # IDE first: boot
        found = _disk_source(drive, vmc_dir, undo, exists, parsed.source)
        if found is None:
            if not skip_missing:
                raise _bad(parsed.source, f"disk {_shown(drive.path)} ({drive.where}) not "
                           f"found: looked for it relative to {vmc_dir}, at its absolute "
                           "path and by its bare name (use --skip-missing to import "
                           "without it)", field="pathname", disk=_shown(drive.path))
            notes.append(Attention("skipped-disk", f"Disk {_shown(drive.path)} "
                                   f"({drive.where}) was not found and is not imported."))
            continue
        bus: Literal["ide", "ahci"] = "ide"
        if drive.controller == "scsi":
            bus = "ide" if ide_used < 4 else "ahci"
            ide_used += bus == "ide"
            notes.append(_scsi_note(drive, bus, first=not disks))
        disks.append(DiskToConvert(f"disk{len(disks)}", found[0], found[1],  # type: ignore
                                   drive.where, bus))
    return tuple(disks)


def _scsi_note(drive: VmcDrive, bus: str, *, first: bool) -> Attention:
    if first:
        return Attention("scsi-boot-to-ide", f"The boot disk moves from {drive.where} to "
                         f"{bus.upper()}: the guest must be able to boot from {bus.upper()} "
                         "(Windows: enable the IDE drivers before moving, e.g. mergeide).")
    return Attention("scsi-to-ide", f"Disk at {drive.where} now sits on {bus.upper()}; "
                     "QEMU has no Adaptec 7870 SCSI adapter.")


def _plan_cds(parsed: VmcConfig, vmc_dir: Path, exists: Callable[[Path], bool],
              notes: list[Attention]) -> tuple[CdToAttach, ...]:
    cds = []
    for drive in (d for d in parsed.drives
                  if d.kind in (DriveKind.CD_DVD_IMAGE, DriveKind.HOST_DRIVE)):
        image = None
        if drive.path.empty:
            pass                                  # an empty drive stays empty
        elif drive.kind is DriveKind.HOST_DRIVE:
            notes.append(Attention("host-drive", f"{drive.where} used the old host's "
                                   f"drive {_shown(drive.path)}: attached empty."))
        else:
            found = resolve_vmc_path(drive.path, vmc_dir, exists)
            image = found[0] if found else None
            if found is None:
                notes.append(Attention("missing-cd-image", f"CD/DVD image "
                                       f"{_shown(drive.path)} ({drive.where}) not found: "
                                       "the drive is attached empty."))
        cds.append(CdToAttach(f"cd{len(cds)}", image, drive.where))
    return tuple(cds)


def _switch_for(network: str, switch_map: Mapping[str, str],
                notes: list[Attention]) -> str:
    if network in switch_map:
        return switch_map[network]
    if "*" in switch_map:
        return switch_map["*"]
    switch = _sanitize_name(network)[:15] or "imported"
    notes.append(Attention("switch-by-name", f"Virtual network '{network}' has no switch "
                           f"mapping: using switch '{switch}' (it must exist)."))
    return switch


def _plan_nics(parsed: VmcConfig, switch_map: Mapping[str, str],
               notes: list[Attention]) -> tuple[NicToCreate, ...]:
    nics = []
    for nic in parsed.nics:
        if not nic.enabled:
            notes.append(Attention("nic-disabled", f"Network adapter {nic.index} is "
                                   "disabled (controller_count) and is not imported."))
            continue
        nics.append(NicToCreate(f"nic{len(nics)}", nic.mac,
                                _switch_for(nic.network_name, switch_map, notes),
                                nic.network_name))
    if nics:
        notes.append(Attention("nic-model", "Virtual PC emulated a DEC 21140 network card; "
                               "the VM gets an Intel e1000: the guest needs its driver."))
    return tuple(nics)


def plan_vmc_import(parsed: VmcConfig, vmc_dir: str | Path, *, name: str | None = None,
                    switch_map: Mapping[str, str] | None = None,
                    undo: UndoChoice | None = None,
                    saved_state: Literal["discard"] | None = None,
                    skip_missing: bool = False,
                    exists: Callable[[Path], bool] = Path.is_file) -> ImportPlan:
    """Decide everything about an import; refuse (InvalidInput) or return the plan."""
    from parvisor.model.vm import MIN_MEMORY, validate_name
    vmc_dir, notes = Path(vmc_dir), []
    vm_name = name or parsed.default_name
    try:
        validate_name(vm_name, "VM name")
    except ValueError as exc:
        raise InvalidInput(str(exc), field="name") from None
    memory = parsed.memory_mib << 20
    if memory < MIN_MEMORY:
        raise _bad(parsed.source, f"ram_size {parsed.memory_mib} MiB is below the minimum "
                   f"of {MIN_MEMORY >> 20} MiB", field="ram_size")
    _check_state(parsed, undo, saved_state, notes)
    disks = _plan_disks(parsed, vmc_dir, undo, skip_missing, exists, notes)
    cds = _plan_cds(parsed, vmc_dir, exists, notes)
    nics = _plan_nics(parsed, switch_map or {}, notes)
    if parsed.additions_installed:
        notes.append(Attention("remove-additions", f"Remove Virtual Machine Additions "
                               f"{parsed.additions_version} inside the guest (Control "
                               "Panel > Add or Remove Programs), ideally before moving."))
    notes += [Attention("not-understood", f"{p} in the .vmc was not understood and is "
                        "ignored.") for p in parsed.not_understood]
    return ImportPlan(vm_name, parsed.smbios_uuid, memory, disks, cds, nics, tuple(notes))
