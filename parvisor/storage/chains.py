"""Backing chains (differencing disks): walk them, check them, find an image's children.

A qcow2 image may name a parent ("backing file") in its header, and QEMU opens that
parent by itself when it opens the child. A hostile header could point the VM at any
file on the host (``/etc/shadow``), at a network protocol (``nbd:``, ``json:{...}``) or
at itself. So before parvisor lets QEMU or qemu-img follow a chain, every link is
checked here: inside the storage roots (symlinks resolved), a plain file path, a
recorded format (never probed), no loops, bounded depth.

This module only reads: it never creates, changes or deletes images.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from parvisor.errors import InvalidInput, StorageError
from parvisor.storage.qemu_img import inspect_image
from parvisor.storage.roots import resolve_in_roots

MAX_CHAIN_DEPTH = 16            # deeper chains are slow and almost always a mistake/attack
BACKING_FORMATS = ("qcow2", "raw")
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_MAX_BACKING_NAME = 1023   # QEMU's own limit for the header's backing file name
# QEMU reads "name:..." (a ':' before any '/') as a protocol (nbd:, json:, http:, ...).
_PROTOCOL = re.compile(r"^[^/]*:")


@dataclass(frozen=True)
class ChainLink:
    """One image of a chain, top first."""

    path: Path
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None       # as written in the header (may be relative)
    backing_format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def backing_target(image: Path, backing_file: str) -> Path:
    """The file a header's backing name means: relative names are relative to the image's
    directory (QEMU's rule); parvisor always passes QEMU resolved paths, so this matches."""
    if _PROTOCOL.match(backing_file):
        raise InvalidInput(f"{image}: backing file {backing_file!r} uses a protocol; only "
                           "plain files inside the storage roots are allowed",
                           path=str(image), backing_file=backing_file)
    target = Path(backing_file)
    return target if target.is_absolute() else image.parent / target


def walk_chain(path: Path, fmt: str, roots: Iterable[Path], *,
               top_in_roots: bool = True) -> list[ChainLink]:
    """Every link from ``path`` down to the base, each checked; refuses with InvalidInput.

    ``top_in_roots=False`` is for sources that are only read (``disk convert SRC``): the
    top file may be anywhere, but its parents are still held to the roots because
    qemu-img would copy their contents into the output.
    """
    roots = tuple(roots)
    current = path.resolve() if not top_in_roots else resolve_in_roots(path, roots)
    links: list[ChainLink] = []
    seen: set[Path] = set()
    while True:
        if current in seen:
            raise InvalidInput(f"{path}: backing chain loops back to {current}",
                               path=str(path), loop_at=str(current))
        if len(links) >= MAX_CHAIN_DEPTH:
            raise InvalidInput(f"{path}: backing chain is deeper than {MAX_CHAIN_DEPTH}",
                               path=str(path))
        seen.add(current)
        link = _inspect_link(path, current, fmt)
        links.append(link)
        if link.backing_file is None:
            return links
        fmt = _backing_format(current, link)
        target = backing_target(current, link.backing_file)
        current = resolve_in_roots(target, roots, what=f"backing file of {current}")


def _inspect_link(top: Path, current: Path, fmt: str) -> ChainLink:
    if not current.is_file():
        what = "image" if current == top.resolve() else f"backing file of {top}"
        raise InvalidInput(f"{what} {current} does not exist or is not a file",
                           path=str(current))
    try:
        info = inspect_image(current, fmt)
    except StorageError as exc:
        raise InvalidInput(f"{current} is not a readable {fmt} image: {exc.message}",
                           path=str(current), format=fmt) from exc
    if info.corrupt:
        raise InvalidInput(f"{current}: qcow2 image is marked corrupt", path=str(current))
    return ChainLink(current, info.format, info.virtual_size, info.actual_size,
                     info.backing_file, info.backing_format)


def _backing_format(image: Path, link: ChainLink) -> str:
    # Without a recorded format QEMU would probe the parent's contents, and a raw parent
    # whose data looks like a qcow2 header could redirect reads anywhere: refuse.
    fmt = link.backing_format
    if fmt not in BACKING_FORMATS:
        raise InvalidInput(f"{image}: backing file {link.backing_file!r} has "
                           f"{'format ' + repr(fmt) if fmt else 'no recorded format'}; "
                           f"need one of {', '.join(BACKING_FORMATS)} (qemu-img rebase -u -F)",
                           path=str(image), backing_format=fmt)
    return fmt


# --- children: who uses an image as its parent --------------------------------------------
def qcow2_backing_name(path: Path) -> str | None:
    """The backing file name in a qcow2 header, read directly (cheap, bounded); None for
    non-qcow2 files and images without a parent."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if offset == 0 or size == 0 or size > QCOW2_MAX_BACKING_NAME:
                return None
            handle.seek(offset)
            return handle.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None


def _image_files(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        for directory, _dirs, files in os.walk(root):      # symlinked dirs not followed
            for name in files:
                candidate = Path(directory) / name
                if candidate.is_file() and not candidate.is_symlink():
                    yield candidate


def children_of(base: Path, roots: Iterable[Path]) -> list[Path]:
    """Images inside the roots whose header names ``base`` as their parent."""
    base = base.resolve()
    children = []
    for candidate in _image_files(roots):
        name = qcow2_backing_name(candidate)
        if name is None or _PROTOCOL.match(name):
            continue
        target = Path(name) if Path(name).is_absolute() else candidate.parent / name
        if target.resolve() == base and candidate.resolve() != base:
            children.append(candidate)
    return sorted(children)
