"""The platform below the devices: firmware generation, NVRAM, vTPM wiring, CPU model.

Hyper-V has two VM generations; so do we:

* **generation 1**: legacy BIOS (QEMU's built-in SeaBIOS), no extra files;
* **generation 2**: UEFI (OVMF from Debian's ``ovmf`` package). The firmware code is a
  shared read-only pflash; the UEFI variable store (boot entries, secure-boot keys) is a
  per-VM copy of the package's ``OVMF_VARS`` template (``nvram.fd`` in the VM's
  directory, created at first start, kept across restarts and removed only with the VM).
  Secure boot uses the ``.ms`` pair (Microsoft keys enrolled), which needs SMM so the
  guest cannot write the variable store behind the firmware's back.

A virtual TPM 2.0 is a ``swtpm`` process per VM (``parvisor.vm.tpm``); here only the
QEMU side of its wiring. ``os_type="windows"`` turns on Hyper-V enlightenments when the
host runs KVM (see ``cpu_model``).

Everything here is pure (paths and arguments in, arguments out): it never copies files
or starts processes (that is ``parvisor.vm.prelaunch``), so golden tests pin it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from parvisor.model.vm import VmDefinition
from parvisor.vm.paths import VmPaths

if TYPE_CHECKING:
    from parvisor.vm.argv import LaunchSpec

OVMF_DIR = Path("/usr/share/OVMF")
# The 4M builds: the 2M ones cannot hold the secure-boot key database plus variables.
OVMF_CODE = "OVMF_CODE_4M.fd"
OVMF_VARS = "OVMF_VARS_4M.fd"
OVMF_CODE_SECURE = "OVMF_CODE_4M.ms.fd"
OVMF_VARS_SECURE = "OVMF_VARS_4M.ms.fd"     # Microsoft KEK/db enrolled, secure boot on
NVRAM_FILE = "nvram.fd"
TPM_DIR = "tpm"                 # swtpm's persistent state (the TPM's keys and NV indices)
TPM_SOCKET = "swtpm.sock"
TPM_PIDFILE = "swtpm.pid"
TPM_LOG = "swtpm.log"

# KVM's Hyper-V enlightenments for Windows guests (QEMU docs/system/i386/hyperv.rst).
# spinlocks=0x1fff: retries before a spinning vCPU tells the hypervisor it waits.
# hv-stimer needs hv-synic and hv-time; hv-synic needs hv-vpindex: all are on together.
HYPERV_ENLIGHTENMENTS = ("hv-relaxed", "hv-vapic", "hv-spinlocks=0x1fff", "hv-time",
                         "hv-synic", "hv-stimer", "hv-vpindex", "hv-runtime", "hv-reset",
                         "hv-frequencies", "hv-reenlightenment", "hv-tlbflush", "hv-ipi")
_CPU_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class UefiFiles:
    """The OVMF pair of one VM: the shared code and the template of its variable store."""

    code: Path
    vars_template: Path


def uefi_files(definition: VmDefinition, ovmf_dir: Path = OVMF_DIR) -> UefiFiles | None:
    """Which OVMF files a VM boots with; None for generation 1 (SeaBIOS is built in)."""
    if definition.generation != 2:
        return None
    if definition.secure_boot:
        return UefiFiles(ovmf_dir / OVMF_CODE_SECURE, ovmf_dir / OVMF_VARS_SECURE)
    return UefiFiles(ovmf_dir / OVMF_CODE, ovmf_dir / OVMF_VARS)


# --- per-VM persistent files (kept by remove_runtime_files; gone with the VM's dir) ---
def nvram_path(paths: VmPaths) -> Path:
    return paths.root / NVRAM_FILE


def tpm_state_dir(paths: VmPaths) -> Path:
    return paths.root / TPM_DIR


def tpm_socket(paths: VmPaths) -> Path:
    return paths.root / TPM_SOCKET


def tpm_pidfile(paths: VmPaths) -> Path:
    return paths.root / TPM_PIDFILE


# --- arguments ------------------------------------------------------------------------
def machine_type(definition: VmDefinition) -> str:
    # smm=on: with secure boot only SMM code may write the variable store.
    return "q35,smm=on" if definition.secure_boot else "q35"


def cpu_model(definition: VmDefinition, accelerator: Literal["kvm", "tcg"],
              baseline: str | None = None) -> str:
    """``host`` (+ Hyper-V enlightenments for Windows) under KVM, ``max`` under TCG;
    with a cluster CPU ``baseline`` that named model instead, with ``enforce``.

    The enlightenments are paravirtual interfaces that KVM implements in the kernel
    (synthetic timers, APIC assists, TLB-flush hypercalls). TCG implements none of them:
    QEMU refuses most ``hv-*`` flags without KVM, and a Windows guest under TCG gains
    nothing from them, so they are only added when the host runs KVM.

    A baseline (processor compatibility mode) exists so the guest sees the same CPU on
    every host it moves to. ``enforce`` makes QEMU refuse to start where the host lacks
    one of the model's features; without it QEMU drops the feature with a warning and
    the guest would see a smaller CPU here than elsewhere, which breaks it after a move.
    """
    base = cpu_model_name(accelerator, baseline)
    if baseline is not None:
        base += ",enforce"
    if accelerator == "kvm" and definition.os_type == "windows":
        return ",".join((base, *HYPERV_ENLIGHTENMENTS))
    return base


def cpu_model_name(accelerator: Literal["kvm", "tcg"], baseline: str | None = None) -> str:
    """Only the model's name (``host``, ``max`` or the baseline), for comparisons."""
    if baseline is None:
        return "host" if accelerator == "kvm" else "max"
    if not _CPU_MODEL_NAME.match(baseline):
        # a ',' would smuggle options into -cpu; QEMU's model names never need one
        raise ValueError(f"CPU baseline {baseline!r} is not a QEMU CPU model name")
    return baseline


def rtc_base(definition: VmDefinition) -> str:
    # Windows keeps the hardware clock in local time; every other OS in UTC.
    return "localtime" if definition.os_type == "windows" else "utc"


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def uefi_args(definition: VmDefinition, paths: VmPaths) -> list[str]:
    files = uefi_files(definition)
    if files is None:
        return []
    args = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(str(files.code))}",
            "-drive", f"if=pflash,format=raw,unit=1,file={_opt(str(nvram_path(paths)))}"]
    if definition.secure_boot:
        # The flash must only be writable from SMM, or the guest could replace the keys.
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


def tpm_args(definition: VmDefinition, paths: VmPaths) -> list[str]:
    if not definition.tpm:
        return []
    # tpm-crb: the TPM 2.0 command-response interface Windows 11 and Linux both use.
    return ["-chardev", f"socket,id=chrtpm,path={_opt(str(tpm_socket(paths)))}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-crb,tpmdev=tpm0"]


def firmware_args(spec: "LaunchSpec") -> list[str]:
    """Firmware flash drives and the vTPM device (nothing for a plain generation 1 VM)."""
    return uefi_args(spec.definition, spec.paths) + tpm_args(spec.definition, spec.paths)
