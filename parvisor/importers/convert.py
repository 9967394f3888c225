"""Disk conversion for imports: hostile source images in, a checked qcow2 out.

What for: ``parvisor import vmc|disk|ovf`` turn foreign disks (VHD fixed/dynamic/
differencing chains, VHDX, streamOptimized/monolithic VMDK, qcow2, raw) into one
standalone qcow2 file each. Every source is validated *before* qemu-img sees it:

* VHD: our own reader (``parvisor.importers.vhd``: footer, dynamic header, BAT,
  parent chain inside the allowed roots); qemu-img gets ``--image-opts`` with the size
  rule spelled out, and differencing chains are flattened by us, because qemu-img 7.2
  does not follow VHD parent locators (raw base + ``apply_copy_plan`` + raw → qcow2);
* VHDX: signature and header check (``check_vhdx``);
* VMDK: only the single-file kinds (magic ``KDMV``: monolithicSparse, streamOptimized).
  A text-descriptor VMDK names its extent files itself — any file on the host — so it
  is refused; a ``parentFileNameHint`` shows up as a backing file and is held to the
  roots like a qcow2 backing file (``walk_chain``);
* every qemu-img call names the format and runs with a memory cap.

After conversion the output's virtual size is compared with what the source promised.

What never: no write to a source file, no file outside the caller's target/scratch
paths, no format probing of untrusted data by qemu-img, no store or VM knowledge
(``parvisor.ops.imports`` owns naming, staging and cleanup).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from parvisor.errors import InvalidInput, StorageError
from parvisor.importers.vhd import (
    VhdChain, apply_copy_plan, check_vhdx, qemu_image_opts, resolve_chain)
from parvisor.storage.chains import QCOW2_MAGIC, walk_chain
from parvisor.storage.qemu_img import popen_limited

Progress = Callable[[float], None]          # fraction 0..1 of this one disk
SOURCE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_MAGIC = ((b"QFI\xfb", "qcow2"), (b"vhdxfile", "vhdx"), (b"KDMV", "vmdk"),
          (b"conectix", "vpc"), (b"# Disk DescriptorFile", "vmdk"))


@dataclass(frozen=True)
class SourceDisk:
    """A validated source: how to hand it to qemu-img and what size it must give."""

    path: Path
    format: str
    virtual_size: int
    chain: VhdChain | None = None           # VHDs only
    warnings: tuple[str, ...] = ()

    @property
    def flatten(self) -> bool:
        return self.chain is not None and len(self.chain.levels) > 1


# --- recognising and validating sources ---------------------------------------------------
def sniff_format(path: Path) -> str:
    """The format by magic bytes (ours, cheap; never qemu-img's probe). Raw otherwise."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 512))
            tail = fh.read(8)
    except OSError as exc:
        raise InvalidInput(f"disk {path}: cannot read: {exc.strerror}",
                           path=str(path)) from exc
    if tail == b"conectix":
        return "vpc"                        # fixed VHD: its only header is the footer
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return "raw"


def validate_source(path: Path, fmt: str, roots: Iterable[Path]) -> SourceDisk:
    """Check a source image before qemu-img reads it; ``roots`` bound its parents."""
    roots = tuple(roots)
    if fmt not in SOURCE_FORMATS:
        raise InvalidInput(f"disk {path}: format {fmt!r} is not supported; use one of "
                           f"{', '.join(SOURCE_FORMATS)}", path=str(path), format=fmt)
    if not path.is_file():
        raise InvalidInput(f"disk {path} does not exist or is not a file", path=str(path))
    if fmt == "vpc":
        return vhd_source(path, roots)
    if fmt == "vhdx":
        check_vhdx(path)
    if _is_descriptor_vmdk(path, fmt):
        raise InvalidInput(f"VMDK {path}: only single-file VMDKs (monolithicSparse, "
                           "streamOptimized) are imported; a descriptor VMDK names extent "
                           "files anywhere on the host (convert it where it was made)",
                           path=str(path), format=fmt)
    link = walk_chain(path, fmt, roots, top_in_roots=False)[0]
    return SourceDisk(path.resolve(), fmt, link.virtual_size)


def _is_descriptor_vmdk(path: Path, fmt: str) -> bool:
    if fmt != "vmdk":
        return False
    with open(path, "rb") as fh:
        return not fh.read(4) == b"KDMV"


def vhd_source(path: Path, roots: Iterable[Path]) -> SourceDisk:
    """A VHD and its whole parent chain; parents must lie inside ``roots``."""
    chain = resolve_chain(path.absolute(), roots)
    return SourceDisk(chain.top.path, "vpc", chain.virtual_size, chain, chain.warnings)


# --- running qemu-img ---------------------------------------------------------------------
def run_convert(argv_source: list[str], target: Path, target_format: str,
                progress: Progress | None = None) -> None:
    """``qemu-img convert -p`` with the source args given; progress parsed from -p."""
    argv = ["qemu-img", "convert", "-p", *argv_source, "-O", target_format, str(target)]
    try:
        proc = popen_limited(argv)
    except OSError as exc:
        raise StorageError(f"qemu-img convert -> {target} failed: {exc}",
                           argv=argv) from exc
    with proc:
        _follow_progress(proc, progress)
        errors = proc.stderr.read().decode(errors="replace").strip()   # type: ignore
        code = proc.wait()
    if code != 0:
        raise StorageError(f"qemu-img convert -> {target} failed: {errors[:500]}",
                           argv=argv, returncode=code)


def _follow_progress(proc: subprocess.Popen, progress: Progress | None) -> None:
    buffer = b""
    while chunk := os.read(proc.stdout.fileno(), 4096):          # type: ignore[union-attr]
        buffer = (buffer + chunk)[-256:]
        found = _PROGRESS.findall(buffer)
        if found and progress:
            progress(min(1.0, float(found[-1]) / 100))


# --- converting ---------------------------------------------------------------------------
def convert_to_qcow2(source: SourceDisk, target: Path, scratch_dir: Path,
                     progress: Progress | None = None) -> int:
    """Write ``target`` (qcow2); returns its virtual size, checked against the source."""
    report = progress or (lambda _fraction: None)
    if source.flatten:
        _flatten_chain(source, target, scratch_dir, report)
    elif source.format == "vpc":
        run_convert(["--image-opts", qemu_image_opts(source.chain.base)],  # type: ignore
                    target, "qcow2", report)
    else:
        run_convert(["-f", source.format, str(source.path)], target, "qcow2", report)
    return check_output_size(target, source)


def _flatten_chain(source: SourceDisk, target: Path, scratch_dir: Path,
                   report: Progress) -> None:
    chain = source.chain
    assert chain is not None
    raw = scratch_dir / f".{target.name}.flat.raw"
    try:
        run_convert(["--image-opts", qemu_image_opts(chain.base)], raw, "raw",
                    lambda f: report(f * 0.45))
        # A child may be larger than its base (a warning from resolve_chain): the raw
        # image must cover the top's virtual size before the child's extents land.
        os.truncate(raw, chain.virtual_size)
        apply_copy_plan(chain.copy_plan(), raw)
        report(0.5)
        run_convert(["-f", "raw", str(raw)], target, "qcow2", lambda f: report(0.5 + f / 2))
    finally:
        raw.unlink(missing_ok=True)


def check_output_size(target: Path, source: SourceDisk) -> int:
    size = qcow2_virtual_size(target)
    if size != source.virtual_size:
        raise StorageError(f"converted {source.path} has virtual size {size}, expected "
                           f"{source.virtual_size}: refusing a disk of the wrong size",
                           path=str(source.path), expected=source.virtual_size, got=size)
    return size


def qcow2_virtual_size(path: Path) -> int:
    """The size field of a qcow2 header (bytes 24-31, big-endian). Read directly: the
    file is our own fresh output, and a ``qemu-img info`` spawn would cost more than
    the whole check (it is a measurable share of a small import, bench/import_vhd.py)."""
    with open(path, "rb") as fh:
        header = fh.read(32)
    if len(header) < 32 or header[:4] != QCOW2_MAGIC:
        raise StorageError(f"{path}: qemu-img wrote no qcow2 header", path=str(path))
    return int.from_bytes(header[24:32], "big")
