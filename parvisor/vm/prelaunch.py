"""What must exist before a VM's QEMU starts, and go away after it ends.

``QemuProcess`` calls exactly two hooks: ``prepare_platform`` after it created the
VM's directory and before it spawns QEMU, and ``release_platform`` once QEMU has exited
(also after a failed launch and for adopted QEMUs). Today they handle the generation 2
NVRAM file (copied from the OVMF template at first start, never overwritten: it holds
the guest's boot entries and secure-boot state) and the vTPM's swtpm process.

The decisions (which files, which arguments) live in ``parvisor.vm.firmware``; this
module only performs them. It must never remove the NVRAM or the TPM state: those go
with the VM's directory when the VM is deleted.
"""

from __future__ import annotations

import os
import pwd
import shutil
from typing import TYPE_CHECKING

from parvisor.errors import VmError
from parvisor.vm import tpm
from parvisor.vm.firmware import nvram_path, uefi_files
from parvisor.vm.paths import VmPaths

if TYPE_CHECKING:
    from parvisor.vm.argv import LaunchSpec


def ensure_nvram(spec: "LaunchSpec") -> None:
    files = uefi_files(spec.definition)
    if files is None:
        return
    if not files.code.is_file() or not files.vars_template.is_file():
        raise VmError(f"generation 2 needs UEFI firmware {files.code.name} and "
                      f"{files.vars_template.name} (Debian package ovmf)")
    target = nvram_path(spec.paths)
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(files.vars_template, partial)
    if spec.run_as:
        user = pwd.getpwnam(spec.run_as)
        os.chown(partial, user.pw_uid, user.pw_gid)
    os.replace(partial, target)     # a crash mid-copy never leaves a truncated store


def prepare_platform(spec: "LaunchSpec") -> None:
    """Create the NVRAM (generation 2) and start swtpm (vTPM) for this launch."""
    ensure_nvram(spec)
    if spec.definition.tpm:
        tpm.start_swtpm(spec.paths, spec.run_as)


def release_platform(paths: VmPaths) -> None:
    """Stop what ``prepare_platform`` started; safe to call when nothing runs."""
    tpm.stop_swtpm(paths)
