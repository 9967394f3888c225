"""qcow2 internal snapshots of images QEMU does *not* have open (``qemu-img snapshot``).

Used for checkpoints of stopped VMs. A running VM's images are locked by QEMU; its
snapshots go through QMP (``parvisor.ops.checkpoint_qmp``). Every call names the
format (``--image-opts driver=qcow2``) and is memory-capped like every qemu-img run. This module only
knows files: it never decides which VM or checkpoint a tag belongs to.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from parvisor.errors import StorageError
from parvisor.storage.qemu_img import _run, run_limited


def list_snapshots(path: Path) -> list[str]:
    """Tags of the internal snapshots in a qcow2 file (read-only, -U: works while a
    VM holds the image)."""
    argv = ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(path)]
    try:
        done = run_limited(argv, inspect=True, timeout=60)
        data = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise StorageError(f"cannot list snapshots of {path}: {exc}", path=str(path)) from exc
    if data is None:
        raise StorageError(f"cannot list snapshots of {path}: {done.stderr.strip()}",
                           path=str(path))
    return [item["name"] for item in data.get("snapshots", [])]


def _opts(path: Path) -> str:
    # `qemu-img snapshot` has no -f: --image-opts names the format just as explicitly
    # (never probed). ',' is the option separator: QEMU escapes it as ',,'.
    return f"driver=qcow2,file.driver=file,file.filename={str(path).replace(',', ',,')}"


def create_snapshot(path: Path, tag: str) -> None:
    _run(["qemu-img", "snapshot", "-q", "--image-opts", "-c", tag, _opts(path)],
         f"qemu-img snapshot -c {tag} {path}", timeout=600)


def apply_snapshot(path: Path, tag: str) -> None:
    _run(["qemu-img", "snapshot", "-q", "--image-opts", "-a", tag, _opts(path)],
         f"qemu-img snapshot -a {tag} {path}", timeout=600)


def delete_snapshot(path: Path, tag: str, *, missing_ok: bool = False) -> None:
    """Drop one snapshot; qcow2 refcounts keep every cluster another snapshot or the
    active image still uses, so no other point in time loses data."""
    if missing_ok and tag not in list_snapshots(path):
        return
    _run(["qemu-img", "snapshot", "-q", "--image-opts", "-d", tag, _opts(path)],
         f"qemu-img snapshot -d {tag} {path}", timeout=600)
