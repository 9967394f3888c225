"""Firmware generations end to end: the tiny guest's disk boots under SeaBIOS (gen 1)
and OVMF (gen 2) through the real service; the gen 2 NVRAM survives restarts; a VM with
a virtual TPM (swtpm) starts, its guest sees /dev/tpm0, and swtpm stops with QEMU; a NIC
first in the boot order network-boots (iPXE on the serial console). Secure boot runs in
tests/slow/test_secure_boot.py (a boot through shim takes ~35 s under TCG)."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest

from parvisor.storage.qemu_img import inspect_image
from parvisor.vm.firmware import OVMF_DIR, OVMF_VARS

from parvisor.testing.guest_fixtures import pid_alive
from parvisor.testing.host_fixture import wait_for

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not shutil.which("swtpm"), reason="swtpm not installed")]


def _boot_from_disk(host, name: str, *extra: str) -> dict:
    vm = host.create_tiny(name, "--boot", "disk", *extra)
    assert vm["boot"]["kind"] == "disk" and vm["disks"][0]["id"] == "boot"
    host.cli("vm", "start", name)
    host.wait_agent(name)
    return vm


def test_tiny_disk_boots_under_seabios_and_ovmf(host):
    gen1 = _boot_from_disk(host, "bios")
    gen2 = _boot_from_disk(host, "uefi", "--generation", "2")
    parents = {inspect_image(Path(vm["disks"][0]["path"])).backing_file
               for vm in (gen1, gen2)}
    assert len(parents) == 1 and "/images/tiny-" in parents.pop()   # one shared parent
    for name in ("bios", "uefi"):  # the kernel came from the disk (GRUB), not -kernel
        qemu = Path(f"/proc/{host.vm(name)['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"-kernel" not in qemu
    assert "BdsDxe" in host.console_log("uefi")       # OVMF's boot manager (serial)
    assert host.cli("vm", "exec", "uefi", "--", "ls", "/sys/firmware/efi").returncode == 0
    assert host.cli("vm", "exec", "bios", "--", "ls", "/sys/firmware/efi",
                    check=False).returncode != 0


def test_gen2_nvram_persists_and_tpm_runs_with_qemu(host):
    host.create_tiny("tpm", "--generation", "2", "--tpm")
    host.cli("vm", "start", "tpm")
    vm_dir = host.vm_dir("tpm")
    nvram = vm_dir / "nvram.fd"
    assert nvram.is_file()
    swtpm_pid = int((vm_dir / "swtpm.pid").read_text())
    assert pid_alive(swtpm_pid)
    host.wait_agent("tpm")
    assert "tpm0" in host.cli("vm", "exec", "tpm", "--", "ls", "/dev").stdout.split()
    host.cli("vm", "turn-off", "tpm")
    wait_for(lambda: not pid_alive(swtpm_pid), 10, "swtpm to stop with QEMU")
    # OVMF stored its boot entries in the VM's own variable store ...
    first_run = nvram.read_bytes()
    assert first_run != Path(OVMF_DIR / OVMF_VARS).read_bytes()
    assert (vm_dir / "tpm" / "tpm2-00.permall").is_file()     # swtpm's persistent state
    # ... which the next start reuses (not a fresh copy of the template)
    inode = nvram.stat().st_ino
    host.cli("vm", "start", "tpm")
    host.wait_agent("tpm")
    assert nvram.stat().st_ino == inode
    host.cli("vm", "turn-off", "tpm")
    assert b"Boot0" in nvram.read_bytes().replace(b"\0", b"")


def test_a_nic_first_in_the_boot_order_network_boots(host):
    # gen 2: OVMF prints its boot manager and iPXE (efi-e1000.rom) on the serial console,
    # SeaBIOS would print only on VGA. Without the NIC's bootindex OVMF would boot the
    # disk (bootindex 1), which works: reaching iPXE proves the order was applied.
    switch = f"pxe{secrets.token_hex(3)}"
    host.cli("switch", "create", switch, "--type", "private")
    # the order may name the tiny boot disk "boot", which `vm create` itself adds
    vm = host.create_tiny("pxe", "--boot", "disk", "--generation", "2",
                          "--nic", f"{switch},model=e1000", "--boot-order", "nic0,boot")
    mac = vm["nics"][0]["mac"]
    assert host.vm("pxe")["boot_order"] == ["nic0", "boot"]
    host.cli("vm", "start", "pxe")
    # iPXE opens the NIC it boots from: "net0: <mac> using 82540em on 0000:..."
    wait_for(lambda: f"net0: {mac} using 82540em" in host.console_log("pxe"), 120,
             "iPXE to start on the e1000 NIC")
    assert "parvisor-guest" not in host.console_log("pxe")     # the disk did not go first
    host.cli("vm", "turn-off", "pxe")
