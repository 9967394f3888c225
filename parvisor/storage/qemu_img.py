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
    backing_format: str | None = None
    actual_size: int | None = None
    corrupt: bool = False       # qcow2 header says so (QEMU refuses to write to it)


def _limit_inspector() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (_INSPECT_LIMIT_BYTES, _INSPECT_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (_INSPECT_CPU_SECONDS, _INSPECT_CPU_SECONDS))


def inspect_image(path: Path, fmt: str | None = None) -> ImageInfo:
    # -U: inspecting must work while a VM holds the image's write lock; we only read.
    argv = ["qemu-img", "info", "--output=json", "-U"]
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
    try:
        data = json.loads(done.stdout)
        corrupt = bool(data.get("format-specific", {}).get("data", {}).get("corrupt"))
        return ImageInfo(data["format"], int(data["virtual-size"]),
                         data.get("backing-filename"), data.get("backing-filename-format"),
                         data.get("actual-size"), corrupt)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"qemu-img info {path}: unexpected output ({exc})",
                           path=str(path)) from exc


def guess_format(path: Path) -> str:
    """Extension first (no probing of untrusted headers), qemu-img as a fallback."""
    suffix = path.suffix.lower()
    if suffix == ".qcow2":
        return "qcow2"
    if suffix in (".raw", ".img"):
        return "raw"
    return inspect_image(path).format


# --- writing: every call names the format (-f, -F, -O); qemu-img never probes ----------
def _limit_memory() -> None:  # runs in the child before exec (no CPU cap: real work)
    resource.setrlimit(resource.RLIMIT_AS, (_INSPECT_LIMIT_BYTES, _INSPECT_LIMIT_BYTES))


def _run(argv: list[str], what: str, *, timeout: float = 3600) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StorageError(f"{what} failed: {exc}", argv=argv) from exc
    if done.returncode != 0:
        raise StorageError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}",
                           argv=argv, returncode=done.returncode)
    return done


def create_image(path: Path, fmt: str, size: int | None, *,
                 backing: Path | None = None, backing_format: str | None = None) -> None:
    """A new image; a qcow2 child records its parent with an absolute path and format."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(backing), "-F", backing_format or "qcow2"]
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    _run(argv, f"qemu-img create {path}", timeout=120)


def resize_image(path: Path, fmt: str, size: int) -> None:
    _run(["qemu-img", "resize", "-q", "-f", fmt, str(path), str(size)],
         f"qemu-img resize {path}", timeout=600)


def convert_image(source: Path, source_format: str, target: Path, target_format: str) -> None:
    # Source files may be hostile (imported VHDs): _run caps qemu-img's memory.
    _run(["qemu-img", "convert", "-q", "-f", source_format, "-O", target_format,
          str(source), str(target)], f"qemu-img convert {source} -> {target}")


def check_image(path: Path, fmt: str) -> None:
    """qemu-img check: refuse images with corrupt metadata (exit 2) or leaks ignored."""
    argv = ["qemu-img", "check", "-q", "-U", "-f", fmt, str(path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                              preexec_fn=_limit_inspector)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StorageError(f"qemu-img check {path} failed: {exc}", path=str(path)) from exc
    # 0 clean, 3 only leaked clusters (harmless), 63 format has no check (raw);
    # 1 (could not check) and 2 (corruption) mean damage or an unreadable file.
    if done.returncode not in (0, 3, 63):
        raise StorageError(f"image {path} is damaged or unreadable: "
                           f"{(done.stderr or done.stdout).strip()[:500]}", path=str(path))
