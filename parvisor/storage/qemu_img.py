"""qemu-img, the one tool that reads and writes disk images.

Images may be hostile (imported, uploaded): always pass an explicit format when known,
and cap qemu-img's memory and CPU time while it inspects a file.
"""

from __future__ import annotations

import json
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from parvisor.errors import StorageError

_INSPECT_LIMIT_BYTES = 1 << 30
_INSPECT_CPU_SECONDS = 30


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    backing_file: str | None


def _limit_inspector() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (_INSPECT_LIMIT_BYTES, _INSPECT_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (_INSPECT_CPU_SECONDS, _INSPECT_CPU_SECONDS))


def inspect_image(path: Path, fmt: str | None = None) -> ImageInfo:
    argv = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    argv.append(str(path))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              preexec_fn=_limit_inspector)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StorageError(f"qemu-img info {path} failed: {exc}", path=str(path)) from exc
    if done.returncode != 0:
        raise StorageError(f"qemu-img cannot read {path}: {done.stderr.strip()}",
                           path=str(path), argv=argv)
    data = json.loads(done.stdout)
    return ImageInfo(data["format"], int(data["virtual-size"]), data.get("backing-filename"))


def guess_format(path: Path) -> str:
    """Extension first (no probing of untrusted headers), qemu-img as a fallback."""
    suffix = path.suffix.lower()
    if suffix == ".qcow2":
        return "qcow2"
    if suffix in (".raw", ".img"):
        return "raw"
    return inspect_image(path).format
