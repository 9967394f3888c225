"""OVF descriptors and OVA archives (DMTF OVF 1.x/2.x, as VirtualBox and VMware export).

What for: ``parvisor import ovf`` reads the descriptor into a typed ``OvfDescriptor``
(CPU, memory, disks with their controllers, NICs, CDs) and opens an OVA (a tar) without
trusting it: only plain files with plain names, the descriptor first, size limits, every
file the descriptor references present (and, when a manifest is present, its digest).

What never: no entity expansion or DTD; no tar member is extracted by name (``tarfile``'s
extract is not used at all: members are copied by us into the caller's folder under a
name we checked); no href that is a URL, absolute, or leaves the package folder.

Public API (called by the wiring)::

    parse_ovf_bytes(data, source=...) -> OvfDescriptor
    load_ovf(path.ovf) -> OvfPackage                  # files beside the descriptor
    open_ova(path.ova) -> OvaListing                  # checks only, nothing written
    extract_ova(path.ova, dest_dir) -> OvfPackage     # the referenced files, verified

Then: convert each ``OvfDisk`` with ``qemu-img convert -f <disk.qemu_format>``; build the
VM from ``descriptor`` (``bus`` already mapped to parvisor's buses).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from parvisor.errors import InvalidInput

MAX_DESCRIPTOR_BYTES = 4 << 20
MAX_MEMBER_BYTES = 1 << 40
MAX_MEMBERS = 64
_CONTROLLERS = {"5": "ide", "6": "scsi", "20": "sata"}
_TARGET_BUS = {"ide": "ide", "sata": "ahci", "scsi": "virtio-scsi"}
_FORMATS = {"vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "qcow2": "qcow2",
            "img": "raw", "raw": "raw", "vdi": "vdi"}
_UNIT_RE = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.IGNORECASE)
_UNIT_NAMES = {"bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20,
               "mb": 1 << 20, "gigabytes": 1 << 30, "gb": 1 << 30}


@dataclass(frozen=True)
class OvfDisk:
    disk_id: str
    href: str                        # file name inside the package
    capacity_bytes: int
    qemu_format: str                 # what to pass to qemu-img -f
    controller: str                  # ide, scsi, sata, or "" when unknown
    bus: Literal["ide", "ahci", "virtio-scsi", "virtio-blk"]
    address: str = ""


@dataclass(frozen=True)
class OvfNic:
    network: str
    model: str                       # ResourceSubType (E1000, PCNet32, VmxNet3 ...)
    mac: str | None = None


@dataclass(frozen=True)
class OvfDescriptor:
    source: str
    name: str
    vcpus: int
    memory_bytes: int
    disks: tuple[OvfDisk, ...]
    nics: tuple[OvfNic, ...]
    cd_drives: int = 0
    files: dict[str, int | None] = field(default_factory=dict)   # href -> size


@dataclass(frozen=True)
class OvfPackage:
    descriptor: OvfDescriptor
    files: dict[str, Path]           # href -> local path of a verified file


@dataclass(frozen=True)
class OvaListing:
    descriptor: OvfDescriptor
    descriptor_member: str
    members: dict[str, int]          # member name -> size
    manifest: dict[str, tuple[str, str]]   # href -> (algorithm, hex digest)


def _bad(source: str, problem: str, **details) -> InvalidInput:
    return InvalidInput(f"OVF {source}: {problem}", path=source, **details)


# --- XML helpers (namespaces differ between OVF 1 and 2: match local names) -------------
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(node: Element, name: str) -> list[Element]:
    return [c for c in node if _local(c.tag) == name]


def _child_text(node: Element, name: str) -> str:
    found = _children(node, name)
    return (found[0].text or "").strip() if found else ""


def _attr(node: Element, name: str) -> str:
    for key, value in node.attrib.items():
        if _local(key) == name:
            return value
    return ""


def _find_all(root: Element, name: str) -> list[Element]:
    return [el for el in root.iter() if _local(el.tag) == name]


def unit_multiplier(units: str, source: str, what: str) -> int:
    """``byte * 2^20``, ``MegaBytes``, ... -> bytes per unit."""
    if not units:
        return 1
    match = _UNIT_RE.match(units)
    if match:
        base, exponent = match.groups()
        return int(base) ** int(exponent) if base else 1
    if units.strip().lower() in _UNIT_NAMES:
        return _UNIT_NAMES[units.strip().lower()]
    raise _bad(source, f"{what}: allocation units '{units}' are not understood",
               field=what)


def _number(text: str, source: str, what: str) -> int:
    if not re.fullmatch(r"\d+", text or ""):
        raise _bad(source, f"{what}: '{text}' is not a whole number (property "
                   "references like ${{...}} are not supported)", field=what)
    return int(text)


def _safe_href(href: str, source: str) -> str:
    path = PurePosixPath(href)
    if (not href or "://" in href or href.startswith(("/", "\\")) or ".." in path.parts
            or "\\" in href or len(path.parts) != 1):
        raise _bad(source, f"file reference '{href}' is not a plain file name in the "
                   "package (URLs, absolute paths and folders are refused)", field="href")
    return href


# --- descriptor ---------------------------------------------------------------------------
def _xml_root(data: bytes, source: str) -> Element:
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise _bad(source, f"descriptor of {len(data)} bytes is over the "
                   f"{MAX_DESCRIPTOR_BYTES} byte limit", field="size")
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=True)
    except DefusedXmlException as exc:
        raise _bad(source, f"forbidden XML construct ({type(exc).__name__})",
                   field="xml") from exc
    except ParseError as exc:
        raise _bad(source, f"malformed or truncated XML ({exc})", field="xml") from exc
    if _local(root.tag) != "Envelope":
        raise _bad(source, f"root element is <{_local(root.tag)}>, not <Envelope>",
                   field="root")
    return root


def _files(root: Element, source: str) -> dict[str, tuple[str, int | None]]:
    files = {}
    for ref in _find_all(root, "References"):
        for item in _children(ref, "File"):
            size = _attr(item, "size")
            files[_attr(item, "id")] = (_safe_href(_attr(item, "href"), source),
                                        _number(size, source, "File size") if size else None)
    return files


def _disk_section(root: Element, source: str, files: dict) -> dict[str, tuple]:
    disks = {}
    for section in _find_all(root, "DiskSection"):
        for disk in _children(section, "Disk"):
            disk_id, file_ref = _attr(disk, "diskId"), _attr(disk, "fileRef")
            if file_ref not in files:
                raise _bad(source, f"disk '{disk_id}' names file '{file_ref}' that "
                           "References does not list", field="fileRef")
            units = unit_multiplier(_attr(disk, "capacityAllocationUnits"), source,
                                    f"disk {disk_id} capacity")
            capacity = _number(_attr(disk, "capacity"), source, f"disk {disk_id} capacity")
            disks[disk_id] = (files[file_ref][0], capacity * units, _attr(disk, "format"))
    return disks


def _qemu_format(href: str, format_uri: str, source: str) -> str:
    if "vmdk" in format_uri.lower():
        return "vmdk"
    suffix = PurePosixPath(href).suffix.lower().lstrip(".")
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    raise _bad(source, f"disk file '{href}': format '{format_uri}' is not supported",
               field="format")


def _system(root: Element, source: str) -> Element:
    systems = _find_all(root, "VirtualSystem")
    if len(systems) != 1:
        raise _bad(source, f"{len(systems)} VirtualSystem elements: one VM per package "
                   "is supported", field="VirtualSystem")
    return systems[0]


def _items(system: Element) -> list[dict[str, str]]:
    items = []
    for section in _children(system, "VirtualHardwareSection"):
        for item in section:
            if _local(item.tag) in ("Item", "StorageItem", "EthernetPortItem"):
                values = {_local(c.tag): (c.text or "").strip() for c in item}
                items.append(values)
    return items


def _memory(items: list[dict[str, str]], source: str) -> int:
    memory = [i for i in items if i.get("ResourceType") == "4"]
    if not memory:
        raise _bad(source, "no memory item (ResourceType 4)", field="memory")
    units = unit_multiplier(memory[0].get("AllocationUnits", "byte * 2^20"), source,
                            "memory")
    return _number(memory[0].get("VirtualQuantity", ""), source, "memory") * units


def _vcpus(items: list[dict[str, str]], source: str) -> int:
    cpus = [i for i in items if i.get("ResourceType") == "3"]
    return _number(cpus[0].get("VirtualQuantity", "1"), source, "CPU") if cpus else 1


def _disk_items(items: list[dict[str, str]], disks: dict, source: str) -> list[OvfDisk]:
    controllers = {i.get("InstanceID"): _CONTROLLERS[i["ResourceType"]]
                   for i in items if i.get("ResourceType") in _CONTROLLERS}
    found = []
    for item in (i for i in items if i.get("ResourceType") == "17"):
        ref = item.get("HostResource", "")
        disk_id = ref.rsplit("/", 1)[-1]
        if disk_id not in disks:
            raise _bad(source, f"disk item '{item.get('ElementName', '')}' refers to "
                       f"'{ref}', which DiskSection does not define", field="HostResource")
        href, capacity, fmt = disks[disk_id]
        controller = controllers.get(item.get("Parent"), "")
        found.append(OvfDisk(disk_id, href, capacity, _qemu_format(href, fmt, source),
                             controller, _TARGET_BUS.get(controller, "virtio-blk"),
                             item.get("AddressOnParent", "")))  # type: ignore[arg-type]
    return found


def parse_ovf_bytes(data: bytes, *, source: str = "<memory>") -> OvfDescriptor:
    root = _xml_root(data, source)
    files = _files(root, source)
    disks = _disk_section(root, source, files)
    system = _system(root, source)
    items = _items(system)
    nics = tuple(OvfNic(i.get("Connection", ""), i.get("ResourceSubType", ""),
                        i.get("Address") or None)
                 for i in items if i.get("ResourceType") == "10")
    name = _child_text(system, "Name") or _attr(system, "id") or "imported-vm"
    return OvfDescriptor(
        source=source, name=name, vcpus=_vcpus(items, source),
        memory_bytes=_memory(items, source), disks=tuple(_disk_items(items, disks, source)),
        nics=nics, cd_drives=sum(1 for i in items if i.get("ResourceType") in ("15", "16")),
        files={href: size for href, size in files.values()})


# --- .ovf folder --------------------------------------------------------------------------
def load_ovf(path: str | Path) -> OvfPackage:
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read(MAX_DESCRIPTOR_BYTES + 1)
    descriptor = parse_ovf_bytes(data, source=str(path))
    files = {}
    for href, size in descriptor.files.items():
        local = path.parent / href
        if not local.is_file():
            raise _bad(str(path), f"referenced file '{href}' is missing (looked for "
                       f"{local})", field="href", file=href)
        if size is not None and local.stat().st_size != size:
            raise _bad(str(path), f"file '{href}' has {local.stat().st_size} bytes, the "
                       f"descriptor says {size}", field="size", file=href)
        files[href] = local
    return OvfPackage(descriptor, files)


# --- .ova ------------------------------------------------------------------------------------
def _check_member(member: tarfile.TarInfo, source: str) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or "\\" in name or len(parts) != 1:
        raise _bad(source, f"archive member '{name}' is not a plain file name (path "
                   "traversal refused)", field="member", member=name)
    if not member.isreg():
        raise _bad(source, f"archive member '{name}' is not a regular file (links and "
                   "devices are refused)", field="member", member=name)
    if member.size > MAX_MEMBER_BYTES:
        raise _bad(source, f"archive member '{name}' is {member.size} bytes, over the "
                   "limit", field="member", member=name)


def _manifest(text: str) -> dict[str, tuple[str, str]]:
    entries = {}
    for line in text.splitlines():
        match = re.match(r"^\s*(SHA1|SHA256|SHA512)\s*\(([^)]+)\)\s*=\s*([0-9a-fA-F]+)",
                         line)
        if match:
            entries[match.group(2)] = (match.group(1).lower(), match.group(3).lower())
    return entries


def open_ova(path: str | Path) -> OvaListing:
    """Check an OVA without writing anything: members, descriptor, references."""
    path, source = Path(path), str(path)
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()[:MAX_MEMBERS + 1]
            if not members or len(members) > MAX_MEMBERS:
                raise _bad(source, f"{len(members)} members: expected 1 to {MAX_MEMBERS}")
            for member in members:
                _check_member(member, source)
            first = members[0]
            if not first.name.lower().endswith(".ovf"):
                raise _bad(source, f"first member is '{first.name}', not the .ovf "
                           "descriptor", field="member")
            descriptor = parse_ovf_bytes(_member_bytes(tar, first, source),
                                         source=f"{source}:{first.name}")
            manifest = _read_manifest(tar, members, source)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _bad(source, f"not a readable tar archive ({exc})", field="archive") from exc
    listing = OvaListing(descriptor, first.name, {m.name: m.size for m in members},
                         manifest)
    _check_references(listing, source)
    return listing


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, source: str) -> bytes:
    if member.size > MAX_DESCRIPTOR_BYTES:
        raise _bad(source, f"'{member.name}' is over the {MAX_DESCRIPTOR_BYTES} byte "
                   "limit", field="size")
    fh = tar.extractfile(member)
    return fh.read() if fh else b""


def _read_manifest(tar: tarfile.TarFile, members: list, source: str) -> dict:
    mfs = [m for m in members if m.name.lower().endswith(".mf")]
    if not mfs:
        return {}
    return _manifest(_member_bytes(tar, mfs[0], source).decode("utf-8", "replace"))


def _check_references(listing: OvaListing, source: str) -> None:
    for href, size in listing.descriptor.files.items():
        if href not in listing.members:
            raise _bad(source, f"referenced file '{href}' is not in the archive",
                       field="href", file=href)
        if size is not None and listing.members[href] != size:
            raise _bad(source, f"'{href}' has {listing.members[href]} bytes, the "
                       f"descriptor says {size}", field="size", file=href)


def extract_ova(path: str | Path, dest_dir: str | Path) -> OvfPackage:
    """Copy the descriptor's files into ``dest_dir`` (must exist, empty, caller's temp
    folder under the storage roots) and verify manifest digests on the way."""
    listing = open_ova(path)
    dest, source = Path(dest_dir), str(path)
    files: dict[str, Path] = {}
    try:
        _extract_into(path, dest, source, listing, files)
    except BaseException:
        for written in files.values():           # nothing half-imported stays behind
            written.unlink(missing_ok=True)
        raise
    return OvfPackage(listing.descriptor, files)


def _extract_into(path: str | Path, dest: Path, source: str, listing: OvaListing,
                  files: dict[str, Path]) -> None:
    with tarfile.open(path, "r:") as tar:
        for href in listing.descriptor.files:
            target = dest / href                     # href was checked: a plain name
            if target.exists():
                raise _bad(source, f"'{target}' already exists: extract into an empty "
                           "folder", field="dest_dir")
            files[href] = target
            digest = _copy_member(tar, tar.getmember(href), target, listing.manifest)
            expected = listing.manifest.get(href)
            if expected and digest != expected[1]:
                raise _bad(source, f"'{href}' does not match its manifest digest "
                           f"({expected[0]})", field="manifest", file=href)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path,
                 manifest: dict) -> str:
    algorithm = manifest.get(member.name, ("sha256", ""))[0]
    hasher = hashlib.new(algorithm)
    src = tar.extractfile(member)
    if src is None:
        raise _bad(str(target), f"member '{member.name}' cannot be read")
    with open(target, "xb") as out:                 # never overwrite anything
        while chunk := src.read(1 << 20):
            hasher.update(chunk)
            out.write(chunk)
    return hasher.hexdigest()
