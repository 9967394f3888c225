"""Disk image files: create, inspect, grow, convert, delete — safely.

The rules every function here keeps (the "hostile files" rules of RELIABILITY.md):

* every file parvisor writes, and every parent of a chain, is inside the storage roots
  (symlinks resolved, ``parvisor.storage.chains``);
* qemu-img always gets the format (``-f``/``-F``/``-O``), never guesses for a write;
* a new file appears complete or not at all: qemu-img writes a hidden temporary name in
  the same directory, which is then linked to the final name (``link`` refuses to
  overwrite, so a file that appeared meanwhile is never clobbered) and unlinked.

Decisions that need the VM store (is a disk used by a VM?) live in ``parvisor.ops.disks``;
this module only knows files. It never talks to QEMU.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from parvisor.errors import AlreadyExists, InvalidInput, StorageError
from parvisor.storage import qemu_img
from parvisor.storage.chains import ChainLink, children_of, walk_chain
from parvisor.storage.roots import resolve_in_roots

VM_DISK_FORMATS = ("qcow2", "raw")                     # what QEMU runs VMs on here
INPUT_FORMATS = ("qcow2", "raw", "vpc", "vhdx", "vmdk")  # what `disk convert` reads
MAX_DISK_SIZE = 64 << 40                                # 64 TiB: qcow2's practical limit
SECTOR = 512
VHD_FOOTER_COOKIE = b"conectix"


def check_size(size: int, what: str = "disk size") -> int:
    if size <= 0 or size > MAX_DISK_SIZE:
        raise InvalidInput(f"{what} must be between 1 byte and 64 TiB, not {size}", size=size)
    if size % SECTOR:
        raise InvalidInput(f"{what} must be a multiple of {SECTOR} bytes (got {size})",
                           size=size)
    return size


def check_format(fmt: str, allowed: tuple[str, ...], what: str = "format") -> str:
    if fmt not in allowed:
        raise InvalidInput(f"{what} {fmt!r} is not supported; use one of {', '.join(allowed)}",
                           format=fmt)
    return fmt


def new_file_target(path: str | Path, roots: Iterable[Path]) -> Path:
    """Where a new image may go: inside the roots, not existing yet."""
    target = resolve_in_roots(path, tuple(roots))
    if target.exists() or target.is_symlink():
        raise AlreadyExists(f"{target} already exists; parvisor never overwrites a disk",
                            path=str(target))
    return target


@contextlib.contextmanager
def atomic_new_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it becomes ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial-{secrets.token_hex(4)}")
    try:
        yield temporary
        try:
            os.link(temporary, target)          # fails if target appeared: no clobbering
        except FileExistsError:
            raise AlreadyExists(f"{target} appeared while it was being written; kept it "
                                "untouched", path=str(target)) from None
        except OSError as exc:
            raise StorageError(f"cannot place {target}: {exc}", path=str(target)) from exc
    finally:
        temporary.unlink(missing_ok=True)


# --- create ---------------------------------------------------------------------------
def create_disk(path: str | Path, roots: Iterable[Path], *, size: int | None,
                fmt: str = "qcow2", parent: str | Path | None = None) -> dict[str, Any]:
    """A new empty disk, or a differencing child over ``parent`` (qcow2 only)."""
    roots = tuple(roots)
    check_format(fmt, VM_DISK_FORMATS)
    target = new_file_target(path, roots)
    if parent is None:
        if size is None:
            raise InvalidInput("give the disk's size (e.g. --size 10G)")
        with atomic_new_file(target) as temporary:
            qemu_img.create_image(temporary, fmt, check_size(size))
        return disk_info(target, roots)
    if fmt != "qcow2":
        raise InvalidInput("a differencing disk (--parent) must be qcow2", format=fmt)
    base = walk_chain(Path(parent), format_of(parent, roots), roots)[0]
    size = base.virtual_size if size is None else check_size(size)
    if size < base.virtual_size:
        raise InvalidInput(f"a child cannot be smaller than its parent "
                           f"({size} < {base.virtual_size} bytes)", size=size)
    with atomic_new_file(target) as temporary:
        qemu_img.create_image(temporary, "qcow2", size, backing=base.path,
                              backing_format=base.format)
    return disk_info(target, roots)


def format_of(path: str | Path, roots: Iterable[Path]) -> str:
    """Format of an image parvisor will *use*: by extension, else qemu-img (rlimited).
    The roots are checked first so no file outside them is even inspected."""
    resolved = resolve_in_roots(path, tuple(roots))
    if not resolved.is_file():
        raise InvalidInput(f"{path} does not exist or is not a file", path=str(path))
    fmt = qemu_img.guess_format(resolved)
    if fmt in ("vpc", "vhdx", "vmdk"):
        raise InvalidInput(f"{path} is a {fmt} image; convert it first: parvisor disk "
                           f"convert {path} NEW.qcow2 (QEMU cannot live-migrate VMs on "
                           f"{fmt})", path=str(path), format=fmt)
    return check_format(fmt, VM_DISK_FORMATS, what=f"{path}: format")


# --- read -----------------------------------------------------------------------------
def disk_info(path: str | Path, roots: Iterable[Path], fmt: str | None = None) -> dict[str, Any]:
    """Format, sizes and the backing chain; a chain problem is reported, not raised, so
    a user can look at a broken image before fixing or deleting it."""
    source = Path(path)
    if not source.is_absolute() or not source.resolve().is_file():
        raise InvalidInput(f"{path} must be an absolute path to an existing file",
                           path=str(path))
    resolved = source.resolve()
    info = qemu_img.inspect_image(resolved, fmt or detect_source_format(resolved))
    result: dict[str, Any] = {
        "path": str(resolved), "format": info.format, "virtual_size": info.virtual_size,
        "actual_size": info.actual_size, "backing_file": info.backing_file,
        "backing_format": info.backing_format, "corrupt": info.corrupt,
        "chain": [], "chain_error": None}
    try:
        chain = walk_chain(resolved, info.format, roots, top_in_roots=False)
        result["chain"] = [link.to_dict() for link in chain[1:]]
    except InvalidInput as exc:
        result["chain_error"] = exc.message
    return result


def validated_chain(path: str | Path, fmt: str, roots: Iterable[Path]) -> list[ChainLink]:
    """For disks a VM will use: top and every parent in the roots, and not damaged."""
    chain = walk_chain(Path(path), fmt, roots)
    for link in chain:
        refuse_damaged(link.path, link.format)
    return chain


def refuse_damaged(path: Path, fmt: str) -> None:
    """A damaged image is bad input (Refused, 400), not a failure of parvisor."""
    try:
        qemu_img.check_image(path, fmt)
    except StorageError as exc:
        raise InvalidInput(exc.message, **exc.details) from exc


# --- change -----------------------------------------------------------------------------
def resize_disk(path: str | Path, roots: Iterable[Path], size: int) -> dict[str, Any]:
    """Grow only: shrinking would cut off guest data (partitions, file systems)."""
    roots = tuple(roots)
    top = walk_chain(Path(path), format_of(path, roots), roots)[0]
    check_size(size, "new size")
    if size < top.virtual_size:
        raise InvalidInput(f"refusing to shrink {top.path} from {top.virtual_size} to "
                           f"{size} bytes: shrinking loses guest data", path=str(top.path),
                           current_size=top.virtual_size, requested_size=size)
    if size == top.virtual_size:
        raise InvalidInput(f"{top.path} is already {size} bytes", path=str(top.path))
    qemu_img.resize_image(top.path, top.format, size)
    return disk_info(top.path, roots)


def convert_disk(source: str | Path, target: str | Path, roots: Iterable[Path], *,
                 source_format: str | None = None, fmt: str = "qcow2") -> dict[str, Any]:
    """Copy an image into a new standalone file (VHD/VHDX in, qcow2/raw out).

    The source may be anywhere readable (it is only read); its parents, if any, must be
    in the roots because their data ends up in the output.
    """
    roots = tuple(roots)
    check_format(fmt, VM_DISK_FORMATS, "output format")
    src = Path(source)
    if not src.is_absolute() or not src.resolve().is_file():
        raise InvalidInput(f"source {source} must be an absolute path to an existing file",
                           path=str(source))
    src_format = source_format or detect_source_format(src.resolve())
    check_format(src_format, INPUT_FORMATS, "source format")
    chain = walk_chain(src, src_format, roots, top_in_roots=False)
    refuse_damaged(chain[0].path, src_format)
    dst = new_file_target(target, roots)
    if dst == chain[0].path:
        raise InvalidInput("source and target are the same file", path=str(dst))
    with atomic_new_file(dst) as temporary:
        qemu_img.convert_image(chain[0].path, src_format, temporary, fmt)
    return disk_info(dst, roots)


def detect_source_format(path: Path) -> str:
    """qemu-img's probe, plus fixed VHDs: their only header is a footer in the last
    sector, so qemu-img calls them raw and a conversion would keep the footer as data
    (and get the size wrong by 512 bytes)."""
    fmt = qemu_img.inspect_image(path).format
    if fmt == "raw" and path.stat().st_size >= SECTOR:
        with open(path, "rb") as handle:
            handle.seek(-SECTOR, os.SEEK_END)
            if handle.read(8) == VHD_FOOTER_COOKIE:
                return "vpc"
    return fmt


def delete_disk(path: str | Path, roots: Iterable[Path],
                in_use: Callable[[Path], list[str]]) -> dict[str, Any]:
    """Remove one image; refused while a child names it as parent or a VM uses it."""
    roots = tuple(roots)
    target = resolve_in_roots(path, roots)
    if not target.is_file():
        raise InvalidInput(f"{target} does not exist or is not a file", path=str(target))
    children = children_of(target, roots)
    if children:
        raise InvalidInput(f"{target} is the parent of {len(children)} differencing "
                           f"disk(s) ({', '.join(map(str, children[:5]))}); delete them first",
                           path=str(target), children=[str(c) for c in children])
    users = in_use(target)
    if users:
        raise InvalidInput(f"{target} is used by VM(s) {', '.join(users)}", path=str(target),
                           vms=users)
    target.unlink()
    return {"deleted": str(target)}


# --- I/O capabilities -------------------------------------------------------------------
def supports_direct_io(path: str | Path) -> bool:
    """Whether the file system under ``path`` accepts O_DIRECT (tmpfs before Linux 6.6
    and some FUSE file systems do not); QEMU fails to open a cache.direct=on disk there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP)
    os.close(fd)
    return True
