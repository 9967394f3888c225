"""A bootable disk of the tiny guest that boots under BIOS (gen 1) *and* UEFI (gen 2).

Layout (GPT, 512-byte sectors)::

    LBA 0          protective MBR whose first 440 bytes are GRUB's boot.img
    LBA 1-33       GPT header and entries (sfdisk)
    LBA 2048-4095  BIOS boot partition: GRUB's i386-pc core.img
    LBA 4096-...   EFI system partition (FAT32): /vmlinuz, /initrd.img and the UEFI
                   boot chain (below)

UEFI boot chain, secure-boot capable (``SignedLoaders`` given, what ``tiny.py`` does):

    /EFI/BOOT/BOOTX64.EFI    shim (shim-signed: signed by Microsoft's UEFI CA, which the
                             OVMF_VARS_4M.ms.fd template enrolls; carries Debian's CA)
    /EFI/BOOT/grubx64.efi    Debian's signed monolithic GRUB (grub-efi-amd64-signed),
                             which shim loads from its own directory and verifies
    /EFI/debian/grub.cfg     where that GRUB looks (its built-in prefix is /EFI/debian)

GRUB then verifies the kernel through shim: Debian's kernels are signed by Debian's CA
(``has_authenticode_signature`` checks one is there). Without secure boot, shim simply
chain-loads GRUB. There is no fbx64.efi next to shim on purpose: shim would run it to
write boot entries and reset the VM. Without ``SignedLoaders`` the ESP holds an unsigned
GRUB x86_64-efi as BOOTX64.EFI instead (boots without secure boot only; a secure-boot
OVMF refuses it with "Access Denied").

Every GRUB carries the same small config: find the ESP by its fixed FAT volume id, load
the kernel and initramfs from it with the tiny image's command line, boot. No menu, no
timeout.

It is built without loop devices, mounts or root-only tools: ``mkfs.fat`` + ``mtools``
write the FAT image as a file, ``sfdisk`` writes the partition table into a file, and
the two GRUB boot-sector patches that ``grub-bios-setup`` would do are done here (they
are two little-endian integers, see ``patch_boot_sector`` / ``patch_core_image``). The
result is converted to qcow2. Debian packages: grub-pc-bin, grub-efi-amd64-bin,
dosfstools, mtools, fdisk (the signed loaders are unpacked from their .debs by the
caller). This module never touches the tiny image's cache or manifest (that is ``tiny.py``).
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
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

PE_SIGNATURE_OFFSET = 0x3C       # u32: file offset of the "PE\0\0" header
PE32_PLUS_MAGIC = 0x20B
CERTIFICATE_TABLE = 4             # data directory index of the Authenticode signatures
SIGNED_GRUB_CONFIG = "::/EFI/debian/grub.cfg"

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


@dataclass(frozen=True)
class SignedLoaders:
    """Signed UEFI binaries for a secure-boot capable ESP (unpacked from Debian's .debs)."""

    shim: Path      # shimx64.efi.signed
    grub: Path      # grubx64.efi.signed


def has_authenticode_signature(pe_image: bytes) -> bool:
    """True when a PE/COFF image (EFI binary, bzImage) carries a signature block.

    Only presence is checked (the certificate table of the PE optional header is
    non-empty): UEFI firmware and shim do the real verification. It lets a build refuse
    an unsigned kernel up front instead of a secure-boot VM failing to boot later.
    """
    try:
        pe = struct.unpack_from("<I", pe_image, PE_SIGNATURE_OFFSET)[0]
        if pe_image[pe:pe + 4] != b"PE\0\0":
            return False
        optional = pe + 24
        magic = struct.unpack_from("<H", pe_image, optional)[0]
        directories = optional + (112 if magic == PE32_PLUS_MAGIC else 96)
        offset, size = struct.unpack_from("<II", pe_image, directories + 8 * CERTIFICATE_TABLE)
    except struct.error:
        return False
    return size > 8 and offset + size <= len(pe_image)


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


def esp_files(kernel: Path, initrd: Path, unsigned_efi: Path, config: Path,
              signed: SignedLoaders | None) -> list[tuple[Path, str]]:
    """(source, path on the ESP) of every file the ESP holds."""
    files = [(kernel, "::/vmlinuz"), (initrd, "::/initrd.img")]
    if signed is None:
        return [(unsigned_efi, "::/EFI/BOOT/BOOTX64.EFI"), *files]
    return [(signed.shim, "::/EFI/BOOT/BOOTX64.EFI"), (signed.grub, "::/EFI/BOOT/grubx64.efi"),
            (config, SIGNED_GRUB_CONFIG), *files]


def _esp_image(files: list[tuple[Path, str]], work: Path) -> Path:
    esp = work / "esp.img"
    size_mib = esp_size_mib(sum(source.stat().st_size for source, _ in files))
    _run(["mkfs.fat", "-C", "-F", "32", "-i", ESP_VOLUME_ID.replace("-", ""),
          "-n", ESP_LABEL, str(esp), str(size_mib * 1024)], "mkfs.fat (ESP)")
    image = f"-i{esp}"
    directories = sorted({target.rsplit("/", 1)[0] for _, target in files} - {"::"})
    _run(["mmd", image, "::/EFI", *[d for d in directories if d != "::/EFI"]], "mmd (ESP)")
    # -m keeps the source mtimes, -Q stops at the first error.
    for source, target in files:
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


def build_boot_disk(kernel: Path, initrd: Path, cmdline: str, out_dir: Path, *,
                    signed: SignedLoaders | None = None, name: str = DISK_FILE) -> Path:
    """Write ``out_dir/<name>``: the kernel + initramfs, bootable by SeaBIOS and OVMF,
    and with ``signed`` loaders by OVMF with secure boot too (the kernel must be signed).
    """
    if signed is not None and not has_authenticode_signature(kernel.read_bytes()):
        raise ImageError(f"{kernel.name} carries no signature: a secure-boot GRUB would "
                         "refuse it (use a kernel from Debian's signed packages)")
    work = out_dir / f".bootdisk-work-{name}"
    work.mkdir()
    try:
        config = work / "grub.cfg"
        config.write_text(grub_config(cmdline))
        core, efi = _grub_images(config, work)
        esp = _esp_image(esp_files(kernel, initrd, efi, config, signed), work)
        raw = work / "disk.raw"
        _write_disk(raw, esp, core)
        target = out_dir / name
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
              str(target)], "qemu-img convert (boot disk)")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
