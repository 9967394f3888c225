"""Where a host keeps the replicas it holds for other hosts' VMs.

What for: the replica host creates one image per replicated disk under its *local*
storage (a replica on shared storage would protect against nothing a shared disk does
not already survive): ``<first local storage root>/replicas/<vm uuid>/<disk id>.qcow2``.
It publishes the free bytes there (``HostRecord.replica_free_bytes``) so that
``replication enable`` and the re-protection after a failover pick a host with room.
"""

from __future__ import annotations

import os
from pathlib import Path

REPLICAS_DIR = "replicas"


def replica_root(storage_roots: tuple[Path, ...] | list[Path], state_dir: Path,
                 shared_storage: Path | None) -> Path:
    """The first storage root outside the shared storage, + ``replicas``; without one,
    ``<state dir>/replicas``."""
    shared = shared_storage.resolve() if shared_storage is not None else None
    for root in storage_roots:
        resolved = Path(root).resolve()
        if shared is None or not resolved.is_relative_to(shared):
            return Path(root) / REPLICAS_DIR
    return Path(state_dir) / REPLICAS_DIR


def replica_image_path(root: Path, vm_uuid: str, disk_id: str) -> Path:
    return Path(root) / vm_uuid / f"{disk_id}.qcow2"


def free_bytes(root: Path) -> int | None:
    """Free bytes of the file system holding ``root`` (created if missing); None when
    it cannot be read (then nothing is published and no replica is placed here)."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        stat = os.statvfs(root)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
