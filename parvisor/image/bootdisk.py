"""A bootable disk of the tiny guest that boots under BIOS (gen 1) *and* UEFI (gen 2).

Layout (GPT, 512-byte sectors)::

    LBA 0          protective MBR whose first 440 bytes are GRUB's boot.img
    LBA 1-33       GPT header and entries (sfdisk)
    LBA 2048-4095  BIOS boot partition: GRUB's i386-pc core.img
    LBA 4096-...   EFI system partition (FAT32): /EFI/BOOT/BOOTX64.EFI (GRUB x86_64-efi),
                   /vmlinuz, /initrd.img

Both GRUB images carry the same small embedded config: find the ESP by its fixed FAT
volume id, load the kernel and initramfs from it with the tiny image's command line,
boot. No ``normal`` module, no menu, no timeout.

It is built without loop devices, mounts or root-only tools: ``mkfs.fat`` + ``mtools``
write the FAT image as a file, ``sfdisk`` writes the partition table into a file, and
the two GRUB boot-sector patches that ``grub-bios-setup`` would do are done here (they
are two little-endian integers, see ``patch_boot_sector`` / ``patch_core_image``). The
result is converted to qcow2. Debian packages: grub-pc-bin, grub-efi-amd64-bin,
dosfstools, mtools, fdisk.

Not for secure boot: this GRUB is unsigned, so a secure-boot VM's OVMF refuses it.
This module never touches the tiny image's cache or manifest (that is ``tiny.py``).
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from pathlib import Path

from parvisor.errors import ImageError

DISK_FILE = "disk.qcow2"
SECTOR = 512
MIB = 1 << 20
BIOS_BOOT_LBA = 2048
BIOS_BOOT_SECTORS = 2048          # 1 MiB: room for core.img (~140 KiB)
ESP_LBA = BIOS_BOOT_LBA + BIOS_BOOT_SECTORS
GPT_BACKUP_SECTORS = 2048         # tail room for the backup GPT (needs 33 sectors)
MIN_ESP_MIB = 40                  # FAT32 needs ~65k clusters
ESP_VOLUME_ID = "5056-4953"       # "PVIS": fixed so GRUB can `search --fs-uuid` for it
ESP_LABEL = "PVTINY"
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_MODULES_COMMON = ("part_gpt", "fat", "search", "search_fs_uuid", "linux", "boot",
                       "echo")
GRUB_MODULES_BIOS = ("biosdisk",)
# GPT type GUIDs (UEFI spec; the first is GRUB's "Hah!IdontNeedEFI").
TYPE_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
TYPE_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DISK_GUID = "5056A001-0000-4000-8000-000000000001"

# Offsets from GRUB's include/grub/i386/pc/boot.h.
BOOT_KERNEL_SECTOR = 0x5C         # u64: LBA of core.img's first sector
BOOT_DRIVE_CHECK = 0x66           # 2-byte jmp; NOPs = trust the BIOS's boot drive (DL)
BOOT_CODE_END = 0x1B8             # after this: disk signature + partition table (keep)
CORE_BLOCKLIST_START = 0x1F4      # u64 in diskboot.img: LBA of the rest of core.img

_SAFE_CMDLINE = re.compile(r"^[A-Za-z0-9 ._,:=/+-]*$")


def grub_config(cmdline: str) -> str:
    """The config embedded into both GRUB images (GRUB's parser is shell-like: we only
    allow characters that need no quoting)."""
    if not _SAFE_CMDLINE.match(cmdline):
        raise ImageError(f"kernel command line {cmdline!r} has characters the boot disk's "
                         "GRUB config cannot carry unquoted")
    return (f"search --no-floppy --fs-uuid --set=root {ESP_VOLUME_ID.lower()}\n"
            f"linux /vmlinuz {cmdline}\n"
            "initrd /initrd.img\n"
            "boot\n")


def esp_size_mib(payload_bytes: int) -> int:
    """ESP size: the payload plus a quarter for FAT overhead, at least MIN_ESP_MIB."""
    return max(MIN_ESP_MIB, math.ceil(payload_bytes * 1.25 / MIB) + 4)


def gpt_script(esp_sectors: int) -> str:
    """sfdisk input for the fixed layout (fixed GUIDs: the same inputs give the same disk)."""
    return (f"label: gpt\nlabel-id: {DISK_GUID}\nfirst-lba: {BIOS_BOOT_LBA}\n"
            f"start={BIOS_BOOT_LBA}, size={BIOS_BOOT_SECTORS}, type={TYPE_BIOS_BOOT}, "
            f"uuid={DISK_GUID[:-1]}2, name=\"bios-boot\"\n"
            f"start={ESP_LBA}, size={esp_sectors}, type={TYPE_ESP}, "
            f"uuid={DISK_GUID[:-1]}3, name=\"esp\"\n")


def patch_boot_sector(boot_img: bytes, core_lba: int) -> bytes:
    """GRUB's boot.img code (the first 0x1b8 bytes) pointing at core.img on ``core_lba``."""
    if len(boot_img) != SECTOR:
        raise ImageError(f"boot.img is {len(boot_img)} bytes, expected {SECTOR}")
    code = bytearray(boot_img[:BOOT_CODE_END])
    struct.pack_into("<Q", code, BOOT_KERNEL_SECTOR, core_lba)
    # What grub-bios-setup does for hard disks: some BIOSes pass a wrong drive in DL
    # only for floppies; the check would send a hard-disk boot to drive 0x80 blindly.
    code[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(code)


def patch_core_image(core_img: bytes, core_lba: int) -> bytes:
    """core.img whose first sector (diskboot) loads the rest from ``core_lba + 1`` on.
    grub-mkimage already wrote the sector count; only the start is ours to set."""
    sectors = math.ceil(len(core_img) / SECTOR)
    if sectors > BIOS_BOOT_SECTORS:
        raise ImageError(f"core.img needs {sectors} sectors, the BIOS boot partition has "
                         f"{BIOS_BOOT_SECTORS}")
    core = bytearray(core_img)
    struct.pack_into("<Q", core, CORE_BLOCKLIST_START, core_lba + 1)
    return bytes(core)


def disk_sectors(esp_sectors: int) -> int:
    return ESP_LBA + esp_sectors + GPT_BACKUP_SECTORS


# --- effects: running the tools ----------------------------------------------------------
def _run(cmd: list[str], what: str, *, input_text: str | None = None) -> None:
    try:
        done = subprocess.run(cmd, input=input_text, capture_output=True, text=True,
                              check=False)
    except OSError as exc:
        raise ImageError(f"{what}: cannot run {cmd[0]}: {exc} (install grub-pc-bin, "
                         "grub-efi-amd64-bin, dosfstools, mtools, fdisk)", command=cmd) from exc
    if done.returncode != 0:
        stderr = (done.stderr or done.stdout).strip()
        raise ImageError(f"{what}: `{' '.join(cmd)}` exited {done.returncode}: {stderr}",
                         command=cmd, stderr=stderr)


def _grub_images(config: Path, work: Path) -> tuple[Path, Path]:
    """(core.img for BIOS, BOOTX64.EFI for UEFI), both with ``config`` embedded."""
    core, efi = work / "core.img", work / "BOOTX64.EFI"
    _run(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-c", str(config),
          "-p", "/boot/grub", *GRUB_MODULES_BIOS, *GRUB_MODULES_COMMON], "grub-mkimage (BIOS)")
    _run(["grub-mkimage", "-O", "x86_64-efi", "-o", str(efi), "-c", str(config),
          "-p", "/EFI/BOOT", *GRUB_MODULES_COMMON], "grub-mkimage (UEFI)")
    return core, efi


def _esp_image(kernel: Path, initrd: Path, efi: Path, work: Path) -> Path:
    esp = work / "esp.img"
    size_mib = esp_size_mib(sum(p.stat().st_size for p in (kernel, initrd, efi)))
    _run(["mkfs.fat", "-C", "-F", "32", "-i", ESP_VOLUME_ID.replace("-", ""),
          "-n", ESP_LABEL, str(esp), str(size_mib * 1024)], "mkfs.fat (ESP)")
    image = f"-i{esp}"
    _run(["mmd", image, "::/EFI", "::/EFI/BOOT"], "mmd (ESP)")
    # -m keeps the source mtimes, -Q stops at the first error.
    for source, target in ((efi, "::/EFI/BOOT/BOOTX64.EFI"), (kernel, "::/vmlinuz"),
                           (initrd, "::/initrd.img")):
        _run(["mcopy", "-m", "-Q", image, str(source), target], f"mcopy {source.name}")
    return esp


def _write_disk(raw: Path, esp: Path, core: Path) -> None:
    esp_sectors = esp.stat().st_size // SECTOR
    with open(raw, "wb") as f:
        f.truncate(disk_sectors(esp_sectors) * SECTOR)
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], "sfdisk",
         input_text=gpt_script(esp_sectors))
    boot_code = patch_boot_sector((GRUB_PC_DIR / "boot.img").read_bytes(), BIOS_BOOT_LBA)
    with open(raw, "r+b") as f:
        f.write(boot_code)                    # offset 0; the partition table stays
        f.seek(BIOS_BOOT_LBA * SECTOR)
        f.write(patch_core_image(core.read_bytes(), BIOS_BOOT_LBA))
        f.seek(ESP_LBA * SECTOR)
        with open(esp, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)


def build_boot_disk(kernel: Path, initrd: Path, cmdline: str, out_dir: Path) -> Path:
    """Write ``out_dir/disk.qcow2``: the kernel + initramfs, bootable by SeaBIOS and OVMF."""
    work = out_dir / ".bootdisk-work"
    work.mkdir()
    try:
        config = work / "grub.cfg"
        config.write_text(grub_config(cmdline))
        core, efi = _grub_images(config, work)
        esp = _esp_image(kernel, initrd, efi, work)
        raw = work / "disk.raw"
        _write_disk(raw, esp, core)
        target = out_dir / DISK_FILE
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
              str(target)], "qemu-img convert (boot disk)")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
