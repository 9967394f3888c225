"""Helpers shared by clones and export/import: new identities and placed files.

``fresh_identity`` gives a copied definition a new uuid and new MACs (a copy must never
collide with its original on a network); ``placed_files`` creates files inside a new
VM's folder all-or-nothing. Never touches the store or QEMU.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import uuid as uuid_mod
from pathlib import Path
from typing import Any, Callable, Iterator

from parvisor.switch import allocate_mac
from parvisor.storage.disks import atomic_new_file, new_file_target

CHUNK = 1 << 20


def fresh_identity(data: dict[str, Any], name: str, in_use: set[str]) -> dict[str, Any]:
    """``data`` (a definition dump) under a new name and uuid, every NIC a new MAC."""
    taken, nics = set(in_use), []
    for nic in data.get("nics", []):
        mac = allocate_mac(taken)
        taken.add(mac)
        nics.append({**nic, "mac": mac})
    return {**data, "name": name, "uuid": str(uuid_mod.uuid4()), "nics": nics,
            "template": False}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def copy_file(source: Path, temporary: Path) -> None:
    shutil.copyfile(source, temporary)


class PlacedFiles:
    """Files made for one new VM; ``remove()`` undoes them (and their empty folder)."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = roots
        self.paths: list[Path] = []

    def place(self, target: Path, write: Callable[[Path], None]) -> Path:
        """Write ``target`` through a temporary name; refuses an existing file."""
        target = new_file_target(target, self.roots)
        with atomic_new_file(target) as temporary:
            write(temporary)
        self.paths.append(target)
        return target

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)
        for directory in {p.parent for p in self.paths}:
            with contextlib.suppress(OSError):
                directory.rmdir()               # only when empty


@contextlib.contextmanager
def placed_files(roots: tuple[Path, ...]) -> Iterator[PlacedFiles]:
    placed = PlacedFiles(roots)
    try:
        yield placed
    except BaseException:
        placed.remove()
        raise
