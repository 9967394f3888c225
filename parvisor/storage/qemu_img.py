"""qemu-img, the one tool that reads and writes disk images.

Images may be hostile (imported, uploaded): always pass an explicit format when known,
and cap qemu-img's memory (and CPU time while it only inspects a file).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from parvisor.errors import StorageError

# Address-space caps, not memory caps: a capped qemu-img fails with "qemu_thread_create:
# Resource temporarily unavailable" once its *reservations* hit the limit. Reading a header
# is single-threaded; real work (convert, create) runs a pool of up to 64 I/O threads with
# 8 MiB stacks each, so it gets room for those. MALLOC_ARENA_MAX keeps glibc from reserving
# 64 MiB of address space per thread arena, which made a 1 GiB cap fail under load.
INSPECT_ADDRESS_SPACE = 1 << 30
INSPECT_CPU_SECONDS = 30
WORK_ADDRESS_SPACE = 4 << 30
_ENV = {**os.environ, "MALLOC_ARENA_MAX": "2"}


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    backing_file: str | None
    backing_format: str | None = None
    actual_size: int | None = None
    corrupt: bool = False       # qcow2 header says so (QEMU refuses to write to it)


def limited(argv: list[str], *, inspect: bool = False) -> list[str]:
    """``argv`` under util-linux wrappers: capped address space (plus CPU time when only
    inspecting), and SIGKILL when the service dies (an interrupted import must not leave
    qemu-img writing on). Wrappers instead of ``preexec_fn``: that is unsafe in a
    threaded service and forces a slow fork of the whole process."""
    caps = ([f"--as={INSPECT_ADDRESS_SPACE}", f"--cpu={INSPECT_CPU_SECONDS}"] if inspect
            else [f"--as={WORK_ADDRESS_SPACE}"])
    return ["setpriv", "--pdeathsig", "KILL", "prlimit", *caps, "--", *argv]


def run_limited(argv: list[str], *, inspect: bool = False,
                timeout: float) -> subprocess.CompletedProcess:
    """Run qemu-img capped (see ``limited``); raises the subprocess errors as they come."""
    return subprocess.run(limited(argv, inspect=inspect), capture_output=True, text=True,
                          timeout=timeout, env=_ENV)


def popen_limited(argv: list[str]) -> subprocess.Popen:
    """A long qemu-img job (convert -p) whose output the caller follows."""
    return subprocess.Popen(limited(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_ENV)


def inspect_image(path: Path, fmt: str | None = None) -> ImageInfo:
    # -U: inspecting must work while a VM holds the image's write lock; we only read.
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    argv.append(str(path))
    try:
        done = run_limited(argv, inspect=True, timeout=60)
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
def _run(argv: list[str], what: str, *, timeout: float = 3600) -> subprocess.CompletedProcess:
    try:
        done = run_limited(argv, timeout=timeout)
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
        done = run_limited(argv, inspect=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StorageError(f"qemu-img check {path} failed: {exc}", path=str(path)) from exc
    # 0 clean, 3 only leaked clusters (harmless), 63 format has no check (raw);
    # 1 (could not check) and 2 (corruption) mean damage or an unreadable file.
    if done.returncode not in (0, 3, 63):
        raise StorageError(f"image {path} is damaged or unreadable: "
                           f"{(done.stderr or done.stdout).strip()[:500]}", path=str(path))
