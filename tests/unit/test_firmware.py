"""Firmware choices, the boot disk's GRUB patches and swtpm handling (pure parts; swtpm
itself runs for a few milliseconds when installed)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from parvisor.errors import ImageError
from parvisor.image import bootdisk
from parvisor.model.vm import VmDefinition
from parvisor.testing.guest_fixtures import pid_alive, short_state_dir
from parvisor.vm import firmware, tpm
from parvisor.vm.paths import VmPaths

UUID = "0b0e5a4e-5c1d-4d7e-9a55-3f2b8c6d7e01"


def vm(**overrides: object) -> VmDefinition:
    data = {"name": "fw", "uuid": UUID, "boot": {"kind": "disk"}, **overrides}
    return VmDefinition.model_validate(data)


def test_generation_1_needs_no_files_and_no_args() -> None:
    assert firmware.uefi_files(vm()) is None
    assert firmware.uefi_args(vm(), VmPaths(Path("/s"), UUID)) == []
    assert firmware.machine_type(vm()) == "q35"


@pytest.mark.parametrize("secure, code, template", [
    (False, "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    (True, "OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd")])
def test_generation_2_picks_the_ovmf_pair(secure: bool, code: str, template: str) -> None:
    files = firmware.uefi_files(vm(generation=2, secure_boot=secure))
    assert files == firmware.UefiFiles(firmware.OVMF_DIR / code, firmware.OVMF_DIR / template)
    assert firmware.machine_type(vm(generation=2, secure_boot=secure)) == \
        ("q35,smm=on" if secure else "q35")


def test_ovmf_package_ships_the_files_we_name() -> None:
    if not firmware.OVMF_DIR.is_dir():
        pytest.skip("ovmf not installed")
    for name in (firmware.OVMF_CODE, firmware.OVMF_VARS, firmware.OVMF_CODE_SECURE,
                 firmware.OVMF_VARS_SECURE):
        assert (firmware.OVMF_DIR / name).is_file(), name


def test_secure_boot_without_generation_2_is_refused() -> None:
    with pytest.raises(ValueError, match="generation 2"):
        vm(secure_boot=True)


def test_enlightenments_only_for_windows_under_kvm() -> None:
    assert firmware.cpu_model(vm(os_type="windows"), "tcg") == "max"
    assert firmware.cpu_model(vm(), "kvm") == "host"
    flags = firmware.cpu_model(vm(os_type="windows"), "kvm").split(",")
    assert flags[0] == "host" and "hv-spinlocks=0x1fff" in flags and "hv-stimer" in flags
    assert firmware.rtc_base(vm(os_type="windows")) == "localtime"


# --- the boot disk's pure parts -----------------------------------------------------------
def test_boot_sector_points_at_core_and_keeps_the_partition_table_area() -> None:
    boot = bytes(range(256)) * 2
    code = bootdisk.patch_boot_sector(boot, 2048)
    assert len(code) == bootdisk.BOOT_CODE_END          # never reaches the table
    assert struct.unpack_from("<Q", code, bootdisk.BOOT_KERNEL_SECTOR)[0] == 2048
    assert code[bootdisk.BOOT_DRIVE_CHECK:bootdisk.BOOT_DRIVE_CHECK + 2] == b"\x90\x90"


def test_core_image_blocklist_starts_after_its_first_sector() -> None:
    core = bootdisk.patch_core_image(bytes(4 * 512), 2048)
    assert struct.unpack_from("<Q", core, bootdisk.CORE_BLOCKLIST_START)[0] == 2049
    with pytest.raises(ImageError, match="sectors"):
        bootdisk.patch_core_image(bytes(2049 * 512), 2048)


def test_grub_config_refuses_characters_that_need_quoting() -> None:
    cfg = bootdisk.grub_config("console=ttyS0 quiet")
    assert "linux /vmlinuz console=ttyS0 quiet\n" in cfg and cfg.endswith("boot\n")
    with pytest.raises(ImageError):
        bootdisk.grub_config("init=/bin/sh; reboot")


def test_gpt_layout_is_fixed_and_esp_fits_the_payload() -> None:
    script = bootdisk.gpt_script(81920)
    assert f"start=2048, size=2048, type={bootdisk.TYPE_BIOS_BOOT}" in script
    assert f"start=4096, size=81920, type={bootdisk.TYPE_ESP}" in script
    assert bootdisk.esp_size_mib(1) == bootdisk.MIN_ESP_MIB
    assert bootdisk.esp_size_mib(100 << 20) >= 125


def _pe_image(cert_offset: int, cert_size: int, *, plus: bool = True) -> bytes:
    """A minimal PE/COFF header: MZ stub, PE signature, optional header, data dirs."""
    image = bytearray(4096)
    image[:2] = b"MZ"
    struct.pack_into("<I", image, bootdisk.PE_SIGNATURE_OFFSET, 0x80)
    image[0x80:0x84] = b"PE\0\0"
    optional = 0x80 + 24
    struct.pack_into("<H", image, optional, 0x20B if plus else 0x10B)
    directories = optional + (112 if plus else 96)
    struct.pack_into("<II", image, directories + 8 * bootdisk.CERTIFICATE_TABLE,
                     cert_offset, cert_size)
    return bytes(image)


def test_authenticode_signature_presence_is_read_from_the_pe_header() -> None:
    assert bootdisk.has_authenticode_signature(_pe_image(2048, 1472))
    assert bootdisk.has_authenticode_signature(_pe_image(2048, 1472, plus=False))
    assert not bootdisk.has_authenticode_signature(_pe_image(0, 0))         # unsigned
    assert not bootdisk.has_authenticode_signature(_pe_image(4000, 1472))   # past the end
    assert not bootdisk.has_authenticode_signature(b"MZ" + bytes(10))       # truncated
    assert not bootdisk.has_authenticode_signature(bytes(4096))             # not PE


def test_secure_boot_esp_chains_shim_to_signed_grub_and_its_config() -> None:
    kernel, initrd, efi, cfg = (Path(n) for n in ("vmlinuz", "initrd", "grub.efi", "cfg"))
    signed = bootdisk.SignedLoaders(shim=Path("shim.signed"), grub=Path("grub.signed"))
    files = dict((target, source) for source, target in
                 bootdisk.esp_files(kernel, initrd, efi, cfg, signed))
    # the firmware's removable-media path runs shim; shim loads grubx64.efi next to it;
    # signed GRUB's built-in prefix is /EFI/debian
    assert files == {"::/EFI/BOOT/BOOTX64.EFI": signed.shim,
                     "::/EFI/BOOT/grubx64.efi": signed.grub,
                     "::/EFI/debian/grub.cfg": cfg,
                     "::/vmlinuz": kernel, "::/initrd.img": initrd}
    assert not any("fbx64" in target for target in files)   # fallback would reset the VM
    unsigned = dict((t, s) for s, t in bootdisk.esp_files(kernel, initrd, efi, cfg, None))
    assert unsigned == {"::/EFI/BOOT/BOOTX64.EFI": efi, "::/vmlinuz": kernel,
                        "::/initrd.img": initrd}


def test_a_secure_boot_disk_refuses_an_unsigned_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_pe_image(0, 0))
    signed = bootdisk.SignedLoaders(shim=tmp_path / "shim", grub=tmp_path / "grub")
    with pytest.raises(ImageError, match="no signature"):
        bootdisk.build_boot_disk(kernel, kernel, "quiet", tmp_path, signed=signed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmlinuz"]    # nothing written


# --- swtpm --------------------------------------------------------------------------------
def test_swtpm_argv_terminates_with_qemu(tmp_path: Path) -> None:
    argv = tpm.swtpm_argv(VmPaths(tmp_path, UUID), "qemu")
    assert "--terminate" in argv and "--daemon" in argv and argv[-2:] == ["--runas", "qemu"]


@pytest.mark.skipif(not shutil.which("swtpm"), reason="swtpm not installed")
def test_swtpm_starts_once_and_stops_by_pid() -> None:
    paths = VmPaths(short_state_dir(), UUID)      # unix socket paths: at most 107 bytes
    paths.root.mkdir(parents=True)
    pid = tpm.start_swtpm(paths)
    try:
        assert tpm.start_swtpm(paths) == pid            # a live one is reused
        assert firmware.tpm_socket(paths).exists()
    finally:
        tpm.stop_swtpm(paths)
        shutil.rmtree(paths.state_dir)
    assert tpm.swtpm_pid(paths) is None and not pid_alive(pid)
    tpm.stop_swtpm(paths)                                 # idempotent
