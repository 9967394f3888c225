"""VHD (Virtual PC / Virtual Server / Hyper-V 2008) validation and differencing chains.

What for: imported ``.vhd`` files are hostile. Before any byte goes to qemu-img this module
reads the footer and dynamic header itself and refuses, with a precise message naming the
file and the field, anything a well-formed VHD cannot be: bad cookie or checksum, sizes
that do not fit the file, a BAT pointing outside it, a parent chain that is missing,
leaves the storage roots, loops or is too deep.

What never: it never writes to an imported image (``apply_copy_plan`` writes only into
the raw target its caller created), never follows a path before checking it against
the storage roots, and never reads more than the headers, the BAT and (for differencing
levels) the sector bitmaps.

Public API (the disk layer / ``import vmc`` wiring calls these)::

    read_vhd(path) -> VhdInfo                      # one file, validated
    resolve_chain(path, roots, *, max_depth=16) -> VhdChain
    chain.copy_plan() -> tuple[CopyExtent, ...]    # how to flatten a differencing chain
    apply_copy_plan(extents, raw_target) -> int    # copy them into a raw target
    qemu_image_opts(info) -> str                   # --image-opts for qemu-img convert
    chs_geometry(size) -> Geometry                 # the spec's CHS algorithm
    check_vhdx(path) -> None                       # cheap VHDX signature check

**The right virtual size.** Virtual PC and Virtual Server size a disk by its CHS geometry
(C x H x S x 512), which is often smaller than ``current size``; Hyper-V, Disk2vhd and
XenServer use ``current size``. QEMU's ``vpc`` driver (7.2, block/vpc.c) uses
``current size`` for the creators ``win ``, ``qem2``, ``d2v ``, ``CTXS``, ``tap\\0`` and
for the maximum geometry 65535/16/255, and CHS for everything else (``vpc ``, ``vs  ``,
``qemu``); the runtime option ``force_size_calc=chs|current_size`` overrides it.
``VhdInfo.virtual_size`` applies the same rule, and ``qemu_image_opts`` passes the rule
explicitly (``driver=vpc,force_size_calc=...``) so the result does not depend on QEMU's
table. ``qemu-img create -f vpc`` rounds sizes *up* to a CHS geometry (creator ``qemu``);
``-o force_size=on`` keeps the exact size (creator ``qem2``). Always pass ``-f vpc``: a
fixed VHD has no cookie at offset 0, so probing reads it as *raw* (footer included).

**Differencing disks.** QEMU's ``vpc`` driver does not follow parent locators: it opens a
differencing VHD as a stand-alone dynamic disk (unallocated blocks read as zeros, sector
bitmaps ignored). So a chain is flattened as ``copy_plan`` says: convert the base with
qemu-img (``-f vpc``, size rule explicit) to a raw or qcow2 target, then copy each child's
allocated sector runs, base to top, from the child file to the target offsets.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
import uuid as uuid_mod
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, Iterable

from parvisor.errors import InvalidInput
from parvisor.storage.roots import resolve_in_roots

SECTOR = 512
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
VHD_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
MAX_VHD_SECTORS = 65535 * 255 * 255          # ~2 TiB: the format's (and QEMU's) limit
MAX_GEOMETRY = (65535, 16, 255)
MAX_LOCATOR_BYTES = 64 * 1024                # a path, not a payload
DEFAULT_MAX_DEPTH = 16
# Creators whose disks QEMU sizes by ``current size`` (block/vpc.c, QEMU 7.2).
CURRENT_SIZE_CREATORS = frozenset({"win ", "qem2", "d2v ", "CTXS", "tap\0"})
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
_DYN = struct.Struct(">8sQQIIII16sII512s192s256x")
_LOCATOR = struct.Struct(">4sIIIQ")


class DiskType(enum.IntEnum):
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


@dataclass(frozen=True)
class Geometry:
    cylinders: int
    heads: int
    sectors: int

    @property
    def size(self) -> int:
        return self.cylinders * self.heads * self.sectors * SECTOR


@dataclass(frozen=True)
class ParentLocator:
    platform: str            # W2ru (relative, UTF-16LE), W2ku (absolute), Wi2r, Wi2k, MacX
    path: str


@dataclass(frozen=True)
class VhdInfo:
    path: Path
    disk_type: DiskType
    creator_app: str
    creator_version: str
    creator_os: str
    original_size: int
    current_size: int
    geometry: Geometry
    virtual_size: int
    size_rule: str           # "chs" or "current_size": what virtual_size was taken from
    uuid: str
    timestamp: datetime
    saved_state: bool
    file_size: int
    block_size: int = 0      # dynamic/differencing only
    max_table_entries: int = 0
    bat_offset: int = 0
    allocated_blocks: int = 0
    parent_uuid: str | None = None
    parent_timestamp: datetime | None = None
    parent_name: str | None = None
    parent_locators: tuple[ParentLocator, ...] = ()

    @property
    def is_differencing(self) -> bool:
        return self.disk_type is DiskType.DIFFERENCING


@dataclass(frozen=True)
class CopyExtent:
    """Copy ``length`` bytes from ``source`` at ``source_offset`` to the target at
    ``target_offset`` (virtual disk offset)."""

    source: Path
    source_offset: int
    target_offset: int
    length: int


@dataclass(frozen=True)
class VhdChain:
    """A validated chain, ``levels[0]`` the base, ``levels[-1]`` the file asked for."""

    levels: tuple[VhdInfo, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def top(self) -> VhdInfo:
        return self.levels[-1]

    @property
    def base(self) -> VhdInfo:
        return self.levels[0]

    @property
    def virtual_size(self) -> int:
        return self.top.virtual_size

    def copy_plan(self) -> tuple[CopyExtent, ...]:
        """Extents to copy over the converted base, base-most child first."""
        extents: list[CopyExtent] = []
        for level in self.levels[1:]:
            extents.extend(allocated_extents(level))
        return tuple(extents)


# --- pure helpers --------------------------------------------------------------------
def vhd_checksum(data: bytes, checksum_at: int) -> int:
    """One's complement of the byte sum, the 4 checksum bytes counted as zero."""
    total = sum(data) - sum(data[checksum_at:checksum_at + 4])
    return (~total) & 0xFFFFFFFF


def chs_geometry(size: int) -> Geometry:
    """CHS for a size, the algorithm of the VHD specification (appendix)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return Geometry(cth // heads, heads, spt)


def size_rule_for(creator_app: str, geometry: Geometry) -> str:
    """QEMU's rule: see the module docstring."""
    if creator_app in CURRENT_SIZE_CREATORS:
        return "current_size"
    if (geometry.cylinders, geometry.heads, geometry.sectors) == MAX_GEOMETRY:
        return "current_size"
    return "chs"


def qemu_image_opts(info: VhdInfo) -> str:
    """``--image-opts`` value that makes qemu-img read exactly what we validated."""
    path = str(info.path).replace(",", ",,")   # qemu option syntax escapes commas
    return (f"driver=vpc,force_size_calc={info.size_rule},"
            f"file.driver=file,file.filename={path}")


def _timestamp(seconds: int) -> datetime:
    return VHD_EPOCH + timedelta(seconds=seconds)


def _ascii(raw: bytes) -> str:
    return raw.decode("latin-1")


def _bad(path: Path, field_name: str, problem: str) -> InvalidInput:
    return InvalidInput(f"VHD {path}: {field_name}: {problem}", path=str(path),
                        field=field_name)


# --- footer ----------------------------------------------------------------------------
def _read_at(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def _locate_footer(path: Path, fh: BinaryIO, file_size: int) -> bytes:
    if file_size < FOOTER_SIZE:
        raise _bad(path, "file size", f"{file_size} bytes is smaller than a VHD footer "
                   "(512 bytes): not a VHD or truncated")
    tail = _read_at(fh, file_size - FOOTER_SIZE, FOOTER_SIZE)
    if tail[:8] == b"conectix":
        return tail
    # Some tools write a 511-byte footer (pre-2004 Virtual PC); accept that form too.
    tail = _read_at(fh, file_size - FOOTER_SIZE + 1, FOOTER_SIZE - 1) + b"\0"
    if tail[:8] == b"conectix":
        return tail
    head = _read_at(fh, 0, FOOTER_SIZE)
    if head[:8] == b"conectix":
        raise _bad(path, "footer", "the footer copy at offset 0 is present but the "
                   "footer at the end of the file is missing: the file is truncated")
    raise _bad(path, "footer cookie", "no 'conectix' footer at the end of the file: "
               "not a VHD")


def _parse_footer(path: Path, raw: bytes, file_size: int) -> dict:
    (cookie, _features, version, data_offset, ts, app, cver, cos, orig, cur, cyl, heads,
     spt, dtype, checksum, uid, saved) = _FOOTER.unpack(raw)
    if vhd_checksum(raw, 64) != checksum:
        raise _bad(path, "footer checksum", f"stored 0x{checksum:08x}, computed "
                   f"0x{vhd_checksum(raw, 64):08x}: the footer is corrupt")
    if version >> 16 != 1:
        raise _bad(path, "footer version", f"0x{version:08x} is not a VHD 1.x footer")
    try:
        disk_type = DiskType(dtype)
    except ValueError:
        raise _bad(path, "disk type", f"{dtype} is not fixed (2), dynamic (3) or "
                   "differencing (4)") from None
    geometry = Geometry(cyl, heads, spt)
    app_text = _ascii(app)
    return dict(disk_type=disk_type, data_offset=data_offset, creator_app=app_text,
                creator_version=f"{cver >> 16}.{cver & 0xFFFF}", creator_os=_ascii(cos),
                original_size=orig, current_size=cur, geometry=geometry,
                uuid=str(uuid_mod.UUID(bytes=uid)), timestamp=_timestamp(ts),
                saved_state=bool(saved), file_size=file_size)


def _virtual_size(path: Path, facts: dict) -> tuple[int, str]:
    geometry, current = facts["geometry"], facts["current_size"]
    rule = size_rule_for(facts["creator_app"], geometry)
    size = geometry.size if rule == "chs" else current
    if size <= 0:
        raise _bad(path, "geometry" if rule == "chs" else "current size",
                   f"virtual size is 0 (geometry {geometry.cylinders}/{geometry.heads}/"
                   f"{geometry.sectors}, current size {current})")
    if size % SECTOR or size // SECTOR >= MAX_VHD_SECTORS:
        raise _bad(path, "current size", f"{size} is not a multiple of 512 or exceeds "
                   "the VHD limit of about 2 TiB")
    if rule == "chs" and geometry.size > current:
        raise _bad(path, "geometry", f"CHS size {geometry.size} exceeds current size "
                   f"{current}: impossible sizes")
    return size, rule


# --- dynamic header, BAT ------------------------------------------------------------------
def _parse_dynamic(path: Path, fh: BinaryIO, facts: dict) -> dict:
    offset, file_size = facts["data_offset"], facts["file_size"]
    if offset + DYNAMIC_HEADER_SIZE > file_size - FOOTER_SIZE or offset < FOOTER_SIZE:
        raise _bad(path, "data offset", f"{offset} does not point at a dynamic header "
                   f"inside the file ({file_size} bytes)")
    raw = _read_at(fh, offset, DYNAMIC_HEADER_SIZE)
    (cookie, _next, bat_offset, version, entries, block_size, checksum, parent_uid,
     parent_ts, _res, parent_name, locators) = _DYN.unpack(raw)
    if cookie != b"cxsparse":
        raise _bad(path, "dynamic header cookie", f"{cookie!r} is not 'cxsparse'")
    if vhd_checksum(raw, 36) != checksum:
        raise _bad(path, "dynamic header checksum", f"stored 0x{checksum:08x}, computed "
                   f"0x{vhd_checksum(raw, 36):08x}: the header is corrupt")
    if version >> 16 != 1:
        raise _bad(path, "dynamic header version", f"0x{version:08x} is not 1.x")
    if block_size < SECTOR or block_size & (block_size - 1) or block_size > 1 << 28:
        raise _bad(path, "block size", f"{block_size} is not a power of two between "
                   "512 bytes and 256 MiB")
    _check_table(path, facts, bat_offset, entries, block_size)
    dyn = dict(block_size=block_size, max_table_entries=entries, bat_offset=bat_offset)
    if facts["disk_type"] is DiskType.DIFFERENCING:
        dyn.update(parent_uuid=str(uuid_mod.UUID(bytes=parent_uid)),
                   parent_timestamp=_timestamp(parent_ts),
                   parent_name=parent_name.decode("utf-16-be", "replace").rstrip("\0"),
                   parent_locators=_parse_locators(path, fh, locators, file_size))
    return dyn


def _check_table(path: Path, facts: dict, bat_offset: int, entries: int,
                 block_size: int) -> None:
    virtual = facts["virtual_size"]
    if entries * block_size < virtual:
        raise _bad(path, "max table entries", f"{entries} blocks of {block_size} bytes "
                   f"cannot hold the virtual size {virtual}: impossible sizes")
    if entries > (MAX_VHD_SECTORS * SECTOR) // block_size + 1:
        raise _bad(path, "max table entries", f"{entries} exceeds the VHD limit")
    if bat_offset < FOOTER_SIZE or bat_offset + entries * 4 > facts["file_size"] - FOOTER_SIZE:
        raise _bad(path, "table offset", f"the block allocation table ({entries} entries "
                   f"at {bat_offset}) does not lie within the file "
                   f"({facts['file_size']} bytes): truncated or corrupt")


def bitmap_size(block_size: int) -> int:
    return ((block_size // SECTOR // 8) + SECTOR - 1) // SECTOR * SECTOR


def _read_bat(path: Path, fh: BinaryIO, info: VhdInfo) -> list[int]:
    """Allocated BAT entries as (sector offsets), validated to lie inside the file."""
    raw = _read_at(fh, info.bat_offset, info.max_table_entries * 4)
    bat = list(struct.unpack(f">{info.max_table_entries}I", raw))
    span = bitmap_size(info.block_size) + info.block_size
    limit = info.file_size - FOOTER_SIZE
    for index, sector in enumerate(bat):
        if sector == 0xFFFFFFFF:
            continue
        start = sector * SECTOR
        if start < FOOTER_SIZE + DYNAMIC_HEADER_SIZE or start + span > limit:
            raise _bad(path, f"BAT entry {index}", f"block at byte {start} (+{span}) "
                       f"lies outside the data area (file is {info.file_size} bytes)")
    return bat


# --- parent locators --------------------------------------------------------------------
def _decode_locator(code: str, data: bytes) -> str | None:
    if code in ("W2ru", "W2ku"):
        return data.decode("utf-16-le", "replace").rstrip("\0")
    if code in ("Wi2r", "Wi2k"):          # deprecated ANSI forms
        return data.decode("latin-1").rstrip("\0")
    if code == "MacX":                    # UTF-8 file URL
        text = data.decode("utf-8", "replace").rstrip("\0")
        return text.removeprefix("file://").removeprefix("localhost")
    return None                           # "Mac " is an alias record: not resolvable here


def _parse_locators(path: Path, fh: BinaryIO, raw: bytes,
                    file_size: int) -> tuple[ParentLocator, ...]:
    found = []
    for slot in range(8):
        code_raw, _space, length, _res, offset = _LOCATOR.unpack_from(raw, slot * 24)
        if code_raw == b"\0\0\0\0" or length == 0:
            continue
        code = _ascii(code_raw)
        if length > MAX_LOCATOR_BYTES or offset + length > file_size - FOOTER_SIZE:
            raise _bad(path, f"parent locator {slot} ({code})", f"{length} bytes at "
                       f"{offset} do not fit in the file")
        text = _decode_locator(code, _read_at(fh, offset, length))
        if text:
            found.append(ParentLocator(code, text))
    return tuple(found)


# --- reading one file ---------------------------------------------------------------------
def read_vhd(path: str | Path) -> VhdInfo:
    """Validate one VHD's footer, dynamic header and BAT; refuse with InvalidInput."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            raw_footer = _locate_footer(path, fh, file_size)
            facts = _parse_footer(path, raw_footer, file_size)
            facts["virtual_size"], facts["size_rule"] = _virtual_size(path, facts)
            if facts["disk_type"] is DiskType.FIXED:
                _check_fixed(path, facts)
                return _info(path, facts, {})
            _check_head_copy(path, fh, raw_footer)
            dyn = _parse_dynamic(path, fh, facts)
            info = _info(path, facts, dyn)
            allocated = sum(1 for e in _read_bat(path, fh, info) if e != 0xFFFFFFFF)
    except OSError as exc:
        raise InvalidInput(f"VHD {path}: cannot read: {exc.strerror}",
                           path=str(path)) from exc
    return _replace(info, allocated_blocks=allocated)


def _replace(info: VhdInfo, **changes) -> VhdInfo:
    return dataclasses.replace(info, **changes)


def _info(path: Path, facts: dict, dyn: dict) -> VhdInfo:
    keep = {k: v for k, v in facts.items() if k != "data_offset"}
    return VhdInfo(path=path, **keep, **dyn)


def _check_fixed(path: Path, facts: dict) -> None:
    data = facts["file_size"] - FOOTER_SIZE
    if data < facts["virtual_size"] or data < facts["current_size"]:
        raise _bad(path, "current size", f"a fixed VHD of {facts['current_size']} bytes "
                   f"needs {facts['current_size'] + FOOTER_SIZE} bytes, the file has "
                   f"{facts['file_size']}: truncated or impossible sizes")


def _check_head_copy(path: Path, fh: BinaryIO, footer: bytes) -> None:
    # QEMU reads the copy at offset 0, we validated the one at the end: they must agree.
    if _read_at(fh, 0, FOOTER_SIZE) != footer:
        raise _bad(path, "footer copy", "the footer copy at offset 0 differs from the "
                   "footer at the end of the file")


def allocated_extents(info: VhdInfo) -> list[CopyExtent]:
    """Sector runs this file holds (differencing: what overrides its parent)."""
    if info.disk_type is DiskType.FIXED:
        return [CopyExtent(info.path, 0, 0, info.virtual_size)]
    extents: list[CopyExtent] = []
    bsize, bmsize = info.block_size, bitmap_size(info.block_size)
    with open(info.path, "rb") as fh:
        for index, sector in enumerate(_read_bat(info.path, fh, info)):
            if sector == 0xFFFFFFFF:
                continue
            bitmap = _read_at(fh, sector * SECTOR, bmsize)
            data_start = sector * SECTOR + bmsize
            for first, count in _bit_runs(bitmap, bsize // SECTOR):
                target = index * bsize + first * SECTOR
                length = min(count * SECTOR, info.virtual_size - target)
                if length > 0:
                    extents.append(CopyExtent(info.path, data_start + first * SECTOR,
                                              target, length))
    return extents


def _bit_runs(bitmap: bytes, bits: int) -> Iterable[tuple[int, int]]:
    """Runs of set bits, most significant bit first (as Virtual PC writes them)."""
    if bitmap[:bits // 8] == b"\xff" * (bits // 8) and bits % 8 == 0:
        yield 0, bits
        return
    start = None
    for bit in range(bits):
        is_set = (bitmap[bit >> 3] >> (7 - (bit & 7))) & 1
        if is_set and start is None:
            start = bit
        elif not is_set and start is not None:
            yield start, bit - start
            start = None
    if start is not None:
        yield start, bits - start


# --- chains -------------------------------------------------------------------------------
# Relative locators first: a moved folder keeps them valid, absolute ones rarely are.
_LOCATOR_ORDER = {"W2ru": 0, "Wi2r": 1, "W2ku": 2, "Wi2k": 3, "MacX": 4}


def _candidates(child: VhdInfo) -> list[Path]:
    """Where the parent may be: relative locators, absolute ones, then bare names."""
    folder = child.path.parent
    ordered = sorted(child.parent_locators, key=lambda loc: _LOCATOR_ORDER.get(
        loc.platform, len(_LOCATOR_ORDER)))
    paths: list[Path] = []
    for loc in ordered:
        win = PureWindowsPath(loc.path)
        if loc.platform in ("W2ru", "Wi2r"):
            paths.append(folder.joinpath(*[p for p in win.parts if p != "."]))
        elif loc.path.startswith("/"):
            paths.append(Path(loc.path))
    names = [PureWindowsPath(loc.path).name for loc in ordered]
    if child.parent_name:
        names.append(PureWindowsPath(child.parent_name).name)
    paths.extend(folder / name for name in names if name)
    return list(dict.fromkeys(paths))


def find_parent(child: VhdInfo, roots: Iterable[Path]) -> Path:
    roots = list(roots)
    tried = _candidates(child)
    for candidate in tried:
        if candidate.is_file():
            return resolve_in_roots(candidate.absolute(), roots, what="VHD parent")
    names = ", ".join(str(p) for p in tried) or "(no parent locator or name)"
    raise InvalidInput(f"VHD {child.path}: parent disk not found (tried {names})",
                       path=str(child.path), parent_name=child.parent_name,
                       tried=[str(p) for p in tried])


def resolve_chain(path: str | Path, roots: Iterable[Path], *,
                  max_depth: int = DEFAULT_MAX_DEPTH) -> VhdChain:
    """Validate ``path`` and every parent; ``levels`` base first."""
    roots = list(roots)
    current = read_vhd(resolve_in_roots(Path(path).absolute(), roots, what="VHD"))
    levels, seen, warnings = [current], {current.path.resolve()}, []
    while current.is_differencing:
        if len(levels) > max_depth:
            raise InvalidInput(f"VHD {path}: differencing chain deeper than {max_depth} "
                               "levels", path=str(path), max_depth=max_depth)
        parent_path = find_parent(current, roots)
        if parent_path in seen:
            raise InvalidInput(f"VHD {current.path}: parent {parent_path} is already in "
                               "the chain: the chain loops", path=str(current.path),
                               parent=str(parent_path))
        parent = read_vhd(parent_path)
        _check_link(current, parent, warnings)
        seen.add(parent_path)
        levels.append(parent)
        current = parent
    return VhdChain(tuple(reversed(levels)), tuple(warnings))


def _check_link(child: VhdInfo, parent: VhdInfo, warnings: list[str]) -> None:
    if child.parent_uuid != parent.uuid:
        raise InvalidInput(
            f"VHD {child.path}: parent UUID {child.parent_uuid} does not match "
            f"{parent.path} (UUID {parent.uuid}): the parent was replaced or modified",
            path=str(child.path), parent=str(parent.path))
    if child.virtual_size != parent.virtual_size:
        warnings.append(f"{child.path.name}: virtual size {child.virtual_size} differs "
                        f"from its parent {parent.path.name} ({parent.virtual_size})")


# --- VHDX --------------------------------------------------------------------------------
def check_vhdx(path: str | Path) -> None:
    """Cheap sanity check before qemu-img: identifier, one header, the region table."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            ident = _read_at(fh, 0, 8)
            heads = [_read_at(fh, off, 4) for off in (64 << 10, 128 << 10)]
            region = _read_at(fh, 192 << 10, 4)
    except OSError as exc:
        raise InvalidInput(f"VHDX {path}: cannot read: {exc.strerror}",
                           path=str(path)) from exc
    if ident != b"vhdxfile":
        raise InvalidInput(f"VHDX {path}: file type identifier: {ident!r} is not "
                           "'vhdxfile'", path=str(path), field="identifier")
    if size < 1 << 20 or b"head" not in heads or region != b"regi":
        raise InvalidInput(f"VHDX {path}: header region: no valid header or region "
                           "table in the first MiB (truncated or corrupt)",
                           path=str(path), field="header")


def apply_copy_plan(extents: Iterable[CopyExtent], raw_target: str | Path) -> int:
    """Copy extents into a raw image (the converted base); returns bytes copied.

    ``os.copy_file_range`` keeps the copy in the kernel (no Python buffers).
    """
    copied = 0
    with open(raw_target, "r+b") as out:
        for extent in extents:
            with open(extent.source, "rb") as src:
                left, s_off, t_off = extent.length, extent.source_offset, extent.target_offset
                while left:
                    done = os.copy_file_range(src.fileno(), out.fileno(), left, s_off, t_off)
                    if done == 0:
                        raise InvalidInput(f"VHD {extent.source}: ends inside an extent "
                                           f"at {s_off}", path=str(extent.source))
                    left, s_off, t_off = left - done, s_off + done, t_off + done
                    copied += done
    return copied
