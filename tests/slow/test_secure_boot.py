"""Secure boot for real (slow tier: a boot through shim + signed GRUB takes ~35 s under
TCG on an idle machine, more under load).

The tiny boot disk's UEFI chain is shim (signed by Microsoft's UEFI CA, enrolled by
OVMF_VARS_4M.ms.fd) -> Debian's signed GRUB -> Debian's signed kernel
(parvisor/image/bootdisk.py). A generation 2 VM with --secure-boot boots it to the guest
agent, and the guest kernel itself reports secure boot on; a disk with an unsigned GRUB
is refused by the firmware ("Access Denied" from OVMF's boot manager)."""

from __future__ import annotations

from pathlib import Path

import pytest

from parvisor.image import bootdisk
from parvisor.testing.host_fixture import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

def guest_sh(host, name: str, script: str) -> str:
    return host.cli("vm", "exec", name, "--", "sh", "-c", script).stdout


def test_secure_boot_vm_boots_the_signed_chain_with_secure_boot_on(host):
    # 512M: with the default 256 MiB this guest resets right after the kernel's EFI stub
    # under secure boot (OVMF 2022.11, TCG; without secure boot 256 MiB boots)
    host.create_tiny("sb", "--boot", "disk", "--generation", "2", "--secure-boot",
                     "--memory", "512M")
    host.cli("vm", "start", "sb")
    host.wait_agent("sb", timeout=300)
    qemu = Path(f"/proc/{host.vm('sb')['pid']}/cmdline").read_bytes()
    assert b"OVMF_CODE_4M.ms.fd" in qemu and b"-kernel" not in qemu   # firmware -> disk
    # The kernel read the firmware's SecureBoot variable (through its EFI stub): it
    # logs "secureboot: Secure boot enabled". (efivarfs is a module the tiny initramfs
    # does not load, so the variable itself is not read here.)
    assert "Secure boot enabled" in guest_sh(host, "sb", "dmesg")


def test_an_unsigned_grub_is_refused_under_secure_boot(host, tiny_image):
    # The same guest on a disk whose UEFI loader is a plain grub-mkimage GRUB.
    storage = host.state_dir / "storage"
    storage.mkdir(exist_ok=True)
    disk = bootdisk.build_boot_disk(tiny_image.kernel, tiny_image.initrd,
                                    tiny_image.cmdline, storage, name="unsigned.qcow2")
    host.cli("vm", "create", "nosb", "--disk", str(disk), "--generation", "2",
             "--secure-boot")
    host.cli("vm", "start", "nosb")
    # OVMF's boot manager: "BdsDxe: failed to load Boot0001 ... : Access Denied"
    wait_for(lambda: "Access Denied" in host.console_log("nosb"), 180,
             "OVMF to refuse the unsigned GRUB")
    log = host.console_log("nosb")
    assert "failed to load Boot0001" in log and "parvisor-guest" not in log
    assert host.vm("nosb")["heartbeat"] != "ok"
    host.cli("vm", "turn-off", "nosb")
