"""A small VHD writer for tests, written from the VHD specification v1.0 (2006).

What for: qemu-img creates fixed and dynamic VHDs but never differencing ones, and it
never writes the creator ``vpc ``/``vs  `` that makes Virtual PC's CHS size rule matter.
Tests write such files here and cross-check them with qemu-img, so the importer's reader
(``parvisor.importers.vhd``) is not only checked against itself.

What never: shipped code must not write VHDs; this is test tooling only. Files are
written whole in memory, so keep them small (a few MiB).

Layout of a dynamic/differencing file: footer copy (512) | dynamic header (1024) |
BAT (padded to 512) | parent locator data (512 each) | blocks (bitmap + data) | footer.
"""

from __future__ import annotations

import struct
import time
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

from parvisor.importers.vhd import (
    SECTOR, VHD_EPOCH, Geometry, bitmap_size, chs_geometry, vhd_checksum)

_TYPES = {"fixed": 2, "dynamic": 3, "differencing": 4}


@dataclass(frozen=True)
class ParentRef:
    """What a child records about its parent: UUID, name and locators."""

    uuid: str
    name: str
    locators: Sequence[tuple[str, str]] = ()     # (platform code, path)
    timestamp: int = 0


def _now() -> int:
    return int(time.time() - VHD_EPOCH.timestamp())


def footer(*, disk_type: str, current_size: int, geometry: Geometry, creator_app: str,
           data_offset: int, uid: uuid_mod.UUID) -> bytes:
    raw = bytearray(struct.pack(
        ">8sIIQI4sI4sQQHBBII16sB427x", b"conectix", 2, 0x00010000, data_offset, _now(),
        creator_app.encode("latin-1"), 0x00050003, b"Wi2k", current_size, current_size,
        geometry.cylinders, geometry.heads, geometry.sectors, _TYPES[disk_type], 0,
        uid.bytes, 0))
    struct.pack_into(">I", raw, 64, vhd_checksum(bytes(raw), 64))
    return bytes(raw)


def _dynamic_header(*, bat_offset: int, entries: int, block_size: int,
                    parent: ParentRef | None, locator_slots: list[tuple[str, int, int]]
                    ) -> bytes:
    name = (parent.name if parent else "").encode("utf-16-be")[:512]
    locs = b"".join(struct.pack(">4sIIIQ", code.encode("latin-1"), space, length, 0,
                                offset) for code, (space, length, offset) in
                    ((c, (SECTOR, ln, off)) for c, ln, off in locator_slots))
    raw = bytearray(struct.pack(
        ">8sQQIIII16sII512s192s256x", b"cxsparse", 0xFFFFFFFFFFFFFFFF, bat_offset,
        0x00010000, entries, block_size, 0,
        uuid_mod.UUID(parent.uuid).bytes if parent else bytes(16),
        parent.timestamp if parent else 0, 0, name.ljust(512, b"\0"),
        locs.ljust(192, b"\0")))
    struct.pack_into(">I", raw, 36, vhd_checksum(bytes(raw), 36))
    return bytes(raw)


def _sectors_written(data: Mapping[int, bytes]) -> dict[int, bytes]:
    """Split writes into whole sectors (offsets and lengths must be sector-aligned)."""
    sectors: dict[int, bytes] = {}
    for offset, blob in data.items():
        if offset % SECTOR or len(blob) % SECTOR:
            raise ValueError("test data must be sector-aligned")
        for i in range(0, len(blob), SECTOR):
            sectors[(offset + i) // SECTOR] = blob[i:i + SECTOR]
    return sectors


def write_vhd(path: Path, *, size: int,
              disk_type: Literal["fixed", "dynamic", "differencing"] = "dynamic",
              data: Mapping[int, bytes] | None = None, creator_app: str = "vpc ",
              block_size: int = 2 << 20, geometry: Geometry | None = None,
              parent: ParentRef | None = None, uid: str | None = None) -> str:
    """Write a VHD; ``size`` is the footer's current size. Returns the file's UUID."""
    geometry = geometry or chs_geometry(size)
    ident = uuid_mod.UUID(uid) if uid else uuid_mod.uuid4()
    sectors = _sectors_written(data or {})
    if disk_type == "fixed":
        body = bytearray(size)
        for sector, blob in sectors.items():
            body[sector * SECTOR:(sector + 1) * SECTOR] = blob
        tail = footer(disk_type="fixed", current_size=size, geometry=geometry,
                      creator_app=creator_app, data_offset=0xFFFFFFFFFFFFFFFF, uid=ident)
        path.write_bytes(bytes(body) + tail)
        return str(ident)
    if (disk_type == "differencing") != (parent is not None):
        raise ValueError("a differencing disk needs a parent, and only it")
    foot = footer(disk_type=disk_type, current_size=size, geometry=geometry,
                  creator_app=creator_app, data_offset=SECTOR, uid=ident)
    path.write_bytes(_dynamic_body(foot, size, block_size, sectors, parent,
                                   full_bitmaps=disk_type == "dynamic"))
    return str(ident)


def _dynamic_body(foot: bytes, size: int, block_size: int, sectors: dict[int, bytes],
                  parent: ParentRef | None, *, full_bitmaps: bool) -> bytes:
    entries = -(-size // block_size)
    bat_offset = 3 * SECTOR
    cursor = bat_offset + -(-entries * 4 // SECTOR) * SECTOR
    locator_slots, locator_data = [], b""
    for code, text in (parent.locators if parent else ()):
        blob = text.encode("utf-8" if code == "MacX" else "utf-16-le")
        locator_slots.append((code, len(blob), cursor + len(locator_data)))
        locator_data += blob.ljust(-(-len(blob) // SECTOR) * SECTOR or SECTOR, b"\0")
    cursor += len(locator_data)
    bat = [0xFFFFFFFF] * entries
    blocks = bytearray()
    per_block, bm_size = block_size // SECTOR, bitmap_size(block_size)
    for index in sorted({s // per_block for s in sectors}):
        bitmap = bytearray(b"\xff" * bm_size if full_bitmaps else bm_size)
        payload = bytearray(block_size)
        for s in (s for s in sectors if s // per_block == index):
            rel = s % per_block
            bitmap[rel >> 3] |= 0x80 >> (rel & 7)
            payload[rel * SECTOR:(rel + 1) * SECTOR] = sectors[s]
        bat[index] = (cursor + len(blocks)) // SECTOR
        blocks += bitmap + payload
    header = _dynamic_header(bat_offset=bat_offset, entries=entries,
                             block_size=block_size, parent=parent,
                             locator_slots=locator_slots)
    bat_raw = struct.pack(f">{entries}I", *bat).ljust(cursor - len(locator_data)
                                                      - bat_offset, b"\xff")
    return foot + header + bat_raw + locator_data + bytes(blocks) + foot
