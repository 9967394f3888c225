"""Which hypervisor do we have? KVM with VT-x/AMD-V, else QEMU's TCG emulation.

``choose_accelerator`` is the pure decision; ``probe_host`` gathers the facts. KVM is
chosen only when /dev/kvm opens *and* the CPU advertises vmx or svm: some machines
(nested clouds with paravirtual KVM variants) expose a /dev/kvm that crashes stock
guest kernels, and TCG is the honest answer there.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal

from parvisor.errors import InvalidInput, VmError

Accelerator = Literal["kvm", "tcg"]
HOST_MEMORY_RESERVE = 512 << 20  # kept for the host itself when reporting room for VMs


@dataclass(frozen=True)
class AcceleratorChoice:
    accelerator: Accelerator
    reason: str

    @property
    def warning(self) -> str | None:
        if self.accelerator == "tcg":
            return ("running without hardware virtualization: QEMU TCG software emulation"
                    f" ({self.reason}); guests run many times slower than under KVM")
        return None


@dataclass(frozen=True)
class HostInfo:
    name: str
    accelerator: Accelerator
    accelerator_reason: str
    accelerator_warning: str | None
    architecture: str
    cpu_model: str
    cores: int
    memory_bytes: int
    free_memory_bytes: int
    free_memory_for_vms_bytes: int
    qemu_version: str


def choose_accelerator(*, kvm_opens: bool, cpu_flags: frozenset[str],
                       override: str | None) -> AcceleratorChoice:
    if override:
        if override not in ("kvm", "tcg"):
            raise InvalidInput(f"PARVISOR_ACCEL must be kvm or tcg, not {override!r}")
        return AcceleratorChoice(override, f"PARVISOR_ACCEL={override}")  # type: ignore[arg-type]
    extension = "vmx" if "vmx" in cpu_flags else "svm" if "svm" in cpu_flags else None
    if not kvm_opens:
        return AcceleratorChoice("tcg", "/dev/kvm is missing or cannot be opened")
    if extension is None:
        return AcceleratorChoice("tcg", "/dev/kvm exists but the CPU advertises neither "
                                        "vmx (Intel VT-x) nor svm (AMD-V)")
    return AcceleratorChoice("kvm", f"/dev/kvm opens and the CPU has {extension}")


def _kvm_opens() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def _cpuinfo() -> tuple[str, frozenset[str]]:
    text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return (model.group(1).strip() if model else platform.processor() or "unknown",
            frozenset(flags.group(1).split()) if flags else frozenset())


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in open("/proc/meminfo", encoding="ascii"):
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return values


@functools.lru_cache(maxsize=4)
def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise VmError(f"cannot run {binary}: {exc}; is qemu-system-x86 installed?") from exc
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip().splitlines()[0]


def current_accelerator() -> AcceleratorChoice:
    _, flags = _cpuinfo()
    return choose_accelerator(kvm_opens=_kvm_opens(), cpu_flags=flags,
                              override=os.environ.get("PARVISOR_ACCEL") or None)


def probe_host(host_name: str | None = None) -> HostInfo:
    arch = platform.machine()
    if arch not in ("x86_64", "amd64"):
        raise VmError(f"parvisor needs a 64-bit x86 host, this one is {arch}")
    model, _ = _cpuinfo()
    choice = current_accelerator()
    memory = _meminfo()
    available = memory.get("MemAvailable", memory.get("MemFree", 0))
    return HostInfo(
        name=host_name or socket.gethostname(), accelerator=choice.accelerator,
        accelerator_reason=choice.reason, accelerator_warning=choice.warning,
        architecture=arch, cpu_model=model, cores=os.cpu_count() or 1,
        memory_bytes=memory.get("MemTotal", 0), free_memory_bytes=available,
        free_memory_for_vms_bytes=max(0, available - HOST_MEMORY_RESERVE),
        qemu_version=qemu_version())
