"""Build the tiny guest image: Debian's cloud kernel plus a busybox initramfs.

The demo and every integration test boot this image. It is built from Debian packages
only (``apt-get download`` + ``dpkg-deb -x``), so no network beyond the package mirror
and nothing hand-compiled:

* ``linux-image-<release>-cloud-amd64`` (resolved from ``linux-image-cloud-amd64``):
  the kernel, and the virtio / ACPI-button / evdev modules in dependency order,
  resolved from ``modules.dep``;
* ``busybox-static``: the whole userspace (shell, mount, insmod, ip, udhcpc, ...);
* ``qemu-guest-agent``: ``qemu-ga`` plus the host's copies of its shared libraries and
  the dynamic loader (the host runs the same Debian release);
* ``shim-signed`` and ``grub-efi-amd64-signed``: the signed UEFI loaders of the boot disk.

``parvisor/image/guest/`` holds the guest-side scripts (``/init`` and friends).
``disk.qcow2`` is the same kernel + initramfs on a GPT disk that boots under SeaBIOS,
OVMF and OVMF with secure boot (``parvisor.image.bootdisk``: shim -> signed GRUB ->
the kernel, which Debian signs), the base of ``vm create --image tiny --boot disk``.

A second flavour, ``generic`` (``build_tiny_image(..., kernel="generic")``, in
``<state_dir>/images/tiny-generic/``), is the same guest on Debian's generic kernel
(``linux-image-amd64``), whose initramfs also loads the e1000 driver: the cloud kernel
has none, so e1000 NICs (bench/network.py, the slow e1000 test) need this one. It has
no boot disk.

The result is cached in ``<state_dir>/images/tiny/`` next to a ``manifest.json``; the
downloaded ``.deb`` files are kept in ``<state_dir>/images/cache/`` (or
``$PARVISOR_IMAGE_CACHE``). A build happens in a temp dir inside ``images/`` and is
renamed into place, so an interrupted build never leaves a half image behind.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

from parvisor.errors import ImageError
from parvisor.image import bootdisk

FORMAT_VERSION = 3             # 2: + disk.qcow2, CD-ROM/ISO 9660 modules; 3: shim ESP
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
GENERIC_KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
QGA_PACKAGE = "qemu-guest-agent"
SHIM_PACKAGE = "shim-signed"
SIGNED_GRUB_PACKAGE = "grub-efi-amd64-signed"
SIGNED_SHIM_FILE = "usr/lib/shim/shimx64.efi.signed"
SIGNED_GRUB_FILE = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
# quiet: fewer kernel lines on a slow (TCG) serial console; panic=-1: reboot at once
# instead of hanging; memhp_default_state=online: hot-added memory is usable at once.
CMDLINE = "console=ttyS0 panic=-1 memhp_default_state=online quiet"
# Loaded by /init in dependency order (deps such as virtio_ring or failover come from
# modules.dep). sd_mod makes virtio-scsi disks visible; evdev gives /dev/input/event*
# for the ACPI power button (button.ko is added when the config builds it as a module).
# sr_mod + isofs: CD-ROMs on virtio-scsi (a cloud-init seed; the cloud kernel has no AHCI).
WANTED_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "sd_mod",
                  "virtio_console", "virtio_balloon", "virtio_mem", "evdev", "sr_mod",
                  "isofs")
MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
# e1000: Intel's emulated NIC (QEMU's legacy adapter); only the generic kernel has it.
GENERIC_EXTRA_MODULES = ("e1000",)
IMAGE_FILES = ("vmlinuz", "initrd.img")
DISK_FILE = bootdisk.DISK_FILE     # optional in a manifest: older/fake builds lack it
CACHE_ENV = "PARVISOR_IMAGE_CACHE"

# package data file -> (path in the initramfs, mode)
GUEST_FILES = {
    "init": ("init", 0o755),
    "parvisor-power": ("sbin/parvisor-power", 0o755),
    "shutdown": ("sbin/shutdown", 0o755),
    "udhcpc.script": ("etc/udhcpc.script", 0o755),
    "os-release": ("etc/os-release", 0o644),
    "profile": ("etc/profile", 0o644),
}

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Flavour:
    """Which Debian kernel a tiny image runs, and what comes with it."""

    name: str
    kernel_metapackage: str
    extra_modules: tuple[str, ...]
    directory: str            # under <state_dir>/images
    boot_disk: bool           # also write disk.qcow2 (with the signed UEFI loaders)


FLAVOURS = {
    "cloud": Flavour("cloud", KERNEL_METAPACKAGE, (), "tiny", True),
    "generic": Flavour("generic", GENERIC_KERNEL_METAPACKAGE, GENERIC_EXTRA_MODULES,
                       "tiny-generic", False),
}


def flavour(kernel: str) -> Flavour:
    try:
        return FLAVOURS[kernel]
    except KeyError:
        raise ImageError(f"unknown tiny image kernel {kernel!r} (one of: "
                         f"{', '.join(FLAVOURS)})") from None


@dataclass(frozen=True)
class TinyImage:
    kernel: Path          # <state_dir>/images/tiny/vmlinuz
    initrd: Path          # <state_dir>/images/tiny/initrd.img
    cmdline: str          # kernel command line (includes console=ttyS0)
    kernel_release: str   # what `uname -r` prints in the guest
    disk: Path | None = None  # disk.qcow2: the same guest on a GPT disk (BIOS + UEFI GRUB)


def tiny_image_dir(state_dir: Path, kernel: str = "cloud") -> Path:
    return Path(state_dir) / "images" / flavour(kernel).directory


def deb_cache_dir(state_dir: Path) -> Path:
    """Where downloaded .deb files are kept (shared between builds and test runs)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path(state_dir) / "images" / "cache"


# --- loading a built image ------------------------------------------------------------

def load_tiny_image(state_dir: Path, kernel: str = "cloud") -> TinyImage | None:
    """The cached image, or None when it is missing, incomplete, corrupt or stale."""
    directory = tiny_image_dir(state_dir, kernel)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if not _manifest_is_current(manifest, directory):
            return None
        return TinyImage(kernel=directory / "vmlinuz", initrd=directory / "initrd.img",
                         cmdline=manifest["cmdline"],
                         kernel_release=manifest["kernel_release"],
                         disk=directory / DISK_FILE if DISK_FILE in manifest["files"] else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_is_current(manifest: dict, directory: Path) -> bool:
    # A changed guest script (or format) must trigger a rebuild, not boot an old /init.
    if manifest.get("format_version") != FORMAT_VERSION:
        return False
    if manifest.get("guest_files_sha256") != guest_files_digest():
        return False
    files = manifest["files"]
    for name in _listed_files(files):
        path = directory / name
        if path.stat().st_size != files[name]["size"]:
            return False
        if sha256_file(path) != files[name]["sha256"]:
            return False
    return True


def _listed_files(files: dict) -> tuple[str, ...]:
    """The files a manifest vouches for: always kernel + initrd, the disk when built."""
    return IMAGE_FILES + ((DISK_FILE,) if DISK_FILE in files else ())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def guest_file_bytes(name: str) -> bytes:
    return resources.files("parvisor.image").joinpath("guest", name).read_bytes()


def guest_files_digest() -> str:
    digest = hashlib.sha256()
    for name in sorted(GUEST_FILES):
        digest.update(name.encode() + b"\0" + guest_file_bytes(name) + b"\0")
    return digest.hexdigest()


# --- running tools --------------------------------------------------------------------

def run_tool(cmd: list[str], what: str, *, cwd: Path | None = None) -> str:
    """Run a host tool; on failure raise ImageError with what failed and its stderr."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ImageError(f"{what}: cannot run {cmd[0]}: {e}", command=cmd) from e
    if proc.returncode != 0:
        stderr = proc.stderr.strip() or proc.stdout.strip()
        raise ImageError(f"{what}: `{' '.join(cmd)}` exited {proc.returncode}: {stderr}",
                         command=cmd, stderr=stderr)
    return proc.stdout


# --- packages -------------------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str

    @property
    def deb_name(self) -> str:
        # apt-get download's file name: the epoch colon is URL-encoded.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def resolve_kernel_package(meta: str = KERNEL_METAPACKAGE) -> str:
    out = run_tool(["apt-cache", "depends", meta], f"resolving {meta}")
    return parse_kernel_depends(out, meta)


def parse_kernel_depends(apt_cache_output: str, meta: str = KERNEL_METAPACKAGE) -> str:
    for line in apt_cache_output.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and m.group(1) != meta:
            return m.group(1)
    raise ImageError(f"no linux-image dependency in `apt-cache depends {meta}`",
                     output=apt_cache_output)


def candidate_package(name: str) -> Package:
    out = run_tool(["apt-cache", "show", "--no-all-versions", name],
                   f"looking up package {name}")
    fields = dict(re.findall(r"^(Version|Architecture): (\S+)$", out, re.M))
    if "Version" not in fields or "Architecture" not in fields:
        raise ImageError(f"apt-cache show {name}: no Version/Architecture", output=out)
    return Package(name, fields["Version"], fields["Architecture"])


def fetch_deb(package: Package, cache_dir: Path) -> Path:
    """The package's .deb from the cache, downloading it (atomically) when missing."""
    target = cache_dir / package.deb_name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        run_tool(["apt-get", "download", f"{package.name}={package.version}"],
                 f"downloading {package.name} {package.version}", cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ImageError(f"apt-get download {package.name} left {len(debs)} .deb files")
        os.replace(debs[0], target)
    return target


def unpack_deb(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")
    return dest


# --- kernel and modules ---------------------------------------------------------------

def kernel_release_of(kernel_root: Path) -> str:
    releases = sorted(p.name for p in (kernel_root / "lib/modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise ImageError(f"expected one kernel release in the kernel package, got {releases}")
    release = releases[0]
    if not (kernel_root / "boot" / f"vmlinuz-{release}").is_file():
        raise ImageError(f"kernel package has no boot/vmlinuz-{release}")
    return release


def ensure_modules_dep(kernel_root: Path, release: str, busybox: Path) -> Path:
    """modules.dep of the unpacked kernel; Debian generates it in postinst, so the .deb
    does not ship it: generate it with busybox depmod when missing."""
    dep = kernel_root / "lib/modules" / release / "modules.dep"
    if not dep.is_file():
        run_tool([str(busybox), "depmod", "-b", str(kernel_root), release],
                 "generating modules.dep")
    if not dep.is_file():
        raise ImageError("depmod did not produce modules.dep")
    return dep


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {module name: (path, [dependency paths])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def resolve_module_order(table: dict[str, tuple[str, list[str]]],
                         wanted: Iterable[str]) -> list[str]:
    """Module paths in load order: every module after all of its dependencies."""
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        if name in done:
            return
        if name not in table:
            who = f" (needed by {needed_by})" if needed_by else ""
            raise ImageError(f"kernel module {name}{who} is not in modules.dep")
        if name in visiting:
            raise ImageError(f"module dependency cycle through {name}")
        visiting.add(name)
        path, deps = table[name]
        for dep in deps:
            visit(module_name(dep), name)
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), None)
    return order


def config_is_module(config_text: str, option: str) -> bool:
    return re.search(rf"^{re.escape(option)}=m$", config_text, re.M) is not None


def wanted_modules(kernel_root: Path, release: str) -> list[str]:
    # The ACPI power button driver is "button"; built in on some kernels, a module here.
    config = (kernel_root / "boot" / f"config-{release}").read_text()
    extra = ["button"] if config_is_module(config, "CONFIG_ACPI_BUTTON") else []
    return list(WANTED_MODULES) + extra


def read_module(path: Path) -> bytes:
    """A module's bytes, decompressed: busybox insmod cannot load compressed ones."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            raise ImageError(f"zstd -dc {path.name} failed: {proc.stderr.decode().strip()}")
        return proc.stdout
    return path.read_bytes()


def uncompressed_module_path(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path


# --- qemu-ga shared libraries -----------------------------------------------------------

def parse_ldd(output: str) -> list[str]:
    """Absolute library paths (including the loader) from ldd output."""
    paths: list[str] = []
    for line in output.splitlines():
        line = line.strip()
        if "not found" in line:
            raise ImageError(f"qemu-ga needs a library the host lacks: {line}")
        m = re.match(r"(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)$", line)
        if m:
            paths.append(m.group(1))
    return paths


def qga_libraries(qemu_ga: Path) -> list[str]:
    return parse_ldd(run_tool(["ldd", str(qemu_ga)], "listing qemu-ga libraries"))


def busybox_applets(busybox: Path) -> list[str]:
    out = run_tool([str(busybox), "--list-full"], "listing busybox applets")
    return sorted(line.strip().lstrip("/") for line in out.splitlines() if line.strip())


# --- the initramfs (cpio newc + gzip, deterministic) ------------------------------------

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


@dataclass
class CpioTree:
    """An in-memory file tree written as a newc cpio archive in sorted path order (so
    parents come before children), with zero mtimes and owners: same input, same bytes."""
    entries: dict[str, tuple[int, bytes, int]] = field(default_factory=dict)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path or path in self.entries:
            return
        self.add_dir(path.rsplit("/", 1)[0] if "/" in path else "")
        self.entries[path] = (S_IFDIR | mode, b"", 0)

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: int = 0) -> None:
        path = path.strip("/")
        if "/" in path:
            self.add_dir(path.rsplit("/", 1)[0])
        self.entries[path] = (mode, data, rdev)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, S_IFCHR | mode, b"", os.makedev(major, minor))

    def write(self, out: io.BufferedIOBase) -> None:
        for ino, path in enumerate(sorted(self.entries), start=1):
            mode, data, rdev = self.entries[path]
            _write_cpio_entry(out, path, ino, mode, data, rdev)
        _write_cpio_entry(out, "TRAILER!!!", 0, 0, b"", 0)


def _write_cpio_entry(out: io.BufferedIOBase, name: str, ino: int, mode: int,
                      data: bytes, rdev: int) -> None:
    nlink = 2 if (mode & 0o170000) == S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink if name != "TRAILER!!!" else 1, 0, len(data),
              0, 0, os.major(rdev), os.minor(rdev), len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    out.write(header + name.encode() + b"\0")
    out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def write_initrd(tree: CpioTree, dest: Path) -> None:
    # filename="" and mtime=0 keep the gzip header free of names and timestamps.
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 mtime=0, compresslevel=6) as gz:
        tree.write(gz)


@dataclass(frozen=True)
class Unpacked:
    kernel_root: Path
    busybox_root: Path
    qga_root: Path
    release: str
    extra_modules: tuple[str, ...] = ()        # the flavour's, on top of WANTED_MODULES
    shim_root: Path | None = None              # unpacked shim-signed (boot disk only)
    grub_root: Path | None = None              # unpacked grub-efi-amd64-signed

    def signed_loaders(self) -> bootdisk.SignedLoaders:
        if self.shim_root is None or self.grub_root is None:
            raise ImageError("the signed UEFI loaders were not unpacked")
        loaders = bootdisk.SignedLoaders(shim=self.shim_root / SIGNED_SHIM_FILE,
                                         grub=self.grub_root / SIGNED_GRUB_FILE)
        for path, package in ((loaders.shim, SHIM_PACKAGE), (loaders.grub,
                                                             SIGNED_GRUB_PACKAGE)):
            if not path.is_file():
                raise ImageError(f"package {package} has no {path.name}")
        return loaders


def add_base_system(tree: CpioTree, busybox: Path) -> None:
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "mnt", "var/lib", "var/log",
              "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
        tree.add_dir(d)
    # The kernel opens /dev/console for /init before /init can mount devtmpfs.
    tree.add_chardev("dev/console", 5, 1)
    tree.add_symlink("var/run", "../run")
    tree.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet != "bin/busybox":
            tree.add_symlink(applet, "/bin/busybox")
    tree.add_file("etc/hostname", b"parvisor-tiny\n")
    tree.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.add_file("etc/group", b"root:x:0:\ntty:x:5:\n")
    for name, (path, mode) in sorted(GUEST_FILES.items()):
        tree.add_file(path, guest_file_bytes(name), mode)


def add_guest_agent(tree: CpioTree, qga_root: Path) -> None:
    binary = qga_root / "usr/sbin/qemu-ga"
    if not binary.is_file():
        raise ImageError("qemu-guest-agent package has no usr/sbin/qemu-ga")
    tree.add_file("usr/sbin/qemu-ga", binary.read_bytes(), 0o755)
    # Same path as on the host: that is where ld.so (and its default search path) look.
    for lib in qga_libraries(binary):
        tree.add_file(lib, Path(lib).resolve().read_bytes(), 0o755)


def add_modules(tree: CpioTree, unpacked: Unpacked) -> list[str]:
    """Copy the wanted modules (decompressed) and write lib/modules/load-order."""
    mod_dir = unpacked.kernel_root / "lib/modules" / unpacked.release
    dep = ensure_modules_dep(unpacked.kernel_root, unpacked.release,
                             unpacked.busybox_root / "bin/busybox")
    wanted = wanted_modules(unpacked.kernel_root, unpacked.release) + list(
        unpacked.extra_modules)
    order = resolve_module_order(parse_modules_dep(dep.read_text()), wanted)
    in_guest = [uncompressed_module_path(p) for p in order]
    for src, dst in zip(order, in_guest):
        tree.add_file(f"lib/modules/{unpacked.release}/{dst}", read_module(mod_dir / src))
    tree.add_file("lib/modules/load-order", "".join(p + "\n" for p in in_guest).encode())
    return [module_name(p) for p in in_guest]


# --- building ---------------------------------------------------------------------------

def _report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def package_names(kind: Flavour) -> dict[str, str]:
    """{role: package name}: kernel, busybox, guest agent, and the signed UEFI loaders
    when the flavour has a boot disk."""
    names = {"kernel": resolve_kernel_package(kind.kernel_metapackage),
             "busybox": BUSYBOX_PACKAGE, "qga": QGA_PACKAGE}
    if kind.boot_disk:
        names.update(shim=SHIM_PACKAGE, grub=SIGNED_GRUB_PACKAGE)
    return names


def fetch_packages(cache_dir: Path, progress: Progress | None,
                   kind: Flavour = FLAVOURS["cloud"]) -> dict[str, Path]:
    """{role: .deb path} for every package the flavour's image is made of."""
    names = package_names(kind)
    debs: dict[str, Path] = {}
    for i, (role, name) in enumerate(names.items()):
        package = candidate_package(name)
        cached = (cache_dir / package.deb_name).is_file()
        _report(progress, 0.05 + 0.45 * i / len(names),
                f"{'using cached' if cached else 'downloading'} {name} {package.version}")
        debs[role] = fetch_deb(package, cache_dir)
    return debs


def deb_version(deb: Path) -> tuple[str, str]:
    out = run_tool(["dpkg-deb", "-f", str(deb), "Package", "Version"], f"reading {deb.name}")
    fields = dict(re.findall(r"^(Package|Version): (\S+)$", out, re.M))
    return fields["Package"], fields["Version"]


def unpack_all(debs: dict[str, Path], work: Path,
               extra_modules: tuple[str, ...] = ()) -> Unpacked:
    roots = {role: unpack_deb(deb, work / role) for role, deb in debs.items()}
    return Unpacked(kernel_root=roots["kernel"], busybox_root=roots["busybox"],
                    qga_root=roots["qga"], release=kernel_release_of(roots["kernel"]),
                    extra_modules=extra_modules, shim_root=roots.get("shim"),
                    grub_root=roots.get("grub"))


def assemble(unpacked: Unpacked, out_dir: Path, progress: Progress | None) -> list[str]:
    tree = CpioTree()
    _report(progress, 0.6, "adding busybox and guest scripts")
    add_base_system(tree, unpacked.busybox_root / "bin/busybox")
    _report(progress, 0.65, "resolving and adding kernel modules")
    modules = add_modules(tree, unpacked)
    _report(progress, 0.75, "adding qemu-guest-agent and its libraries")
    add_guest_agent(tree, unpacked.qga_root)
    _report(progress, 0.8, "writing initrd.img")
    write_initrd(tree, out_dir / "initrd.img")
    shutil.copyfile(unpacked.kernel_root / "boot" / f"vmlinuz-{unpacked.release}",
                    out_dir / "vmlinuz")
    return modules


def write_manifest(out_dir: Path, unpacked: Unpacked, debs: dict[str, Path],
                   modules: list[str]) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "kernel_release": unpacked.release,
        "cmdline": CMDLINE,
        "packages": dict(sorted(deb_version(deb) for deb in debs.values())),
        "modules": modules,
        "guest_files_sha256": guest_files_digest(),
        "files": {name: {"sha256": sha256_file(out_dir / name),
                         "size": (out_dir / name).stat().st_size}
                  for name in (*IMAGE_FILES, DISK_FILE) if (out_dir / name).exists()},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _remove_leftovers(images: Path, directory: str) -> None:
    # Temp dirs of builds that were interrupted (we hold the lock: none is running).
    for pattern in (f".{directory}-build-*", f".{directory}-old-*"):
        for stale in images.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _install(build_dir: Path, target: Path) -> None:
    """Swap the finished build into place; readers see the old image or the new one
    (or briefly none, which load_tiny_image reports as "not built")."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
        os.replace(target, old / target.name)
    os.replace(build_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(build_dir: Path, cache_dir: Path, progress: Progress | None,
                kind: Flavour = FLAVOURS["cloud"]) -> None:
    _report(progress, 0.0, f"resolving {kind.kernel_metapackage}")
    debs = fetch_packages(cache_dir, progress, kind)
    _report(progress, 0.5, "unpacking packages")
    work = build_dir / "unpacked"
    unpacked = unpack_all(debs, work, kind.extra_modules)
    modules = assemble(unpacked, build_dir, progress)
    if kind.boot_disk:
        _report(progress, 0.85, "writing the bootable disk (GPT, BIOS GRUB + UEFI shim "
                                "and signed GRUB)")
        bootdisk.build_boot_disk(build_dir / "vmlinuz", build_dir / "initrd.img", CMDLINE,
                                 build_dir, signed=unpacked.signed_loaders())
    _report(progress, 0.9, "writing manifest")
    write_manifest(build_dir, unpacked, debs, modules)
    shutil.rmtree(work)


def build_tiny_image(state_dir: Path, *, force: bool = False,
                     progress: Progress | None = None, kernel: str = "cloud") -> TinyImage:
    """Build (or reuse) the tiny image under <state_dir>/images/tiny (``kernel="generic"``:
    the generic-kernel flavour under images/tiny-generic)."""
    kind = flavour(kernel)
    images = Path(state_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    # One build at a time per state dir and flavour; a waiter then finds it cached.
    with open(images / f".{kind.directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (image := load_tiny_image(state_dir, kernel)) is not None:
            _report(progress, 1.0, "tiny image already built")
            return image
        _remove_leftovers(images, kind.directory)
        build_dir = Path(tempfile.mkdtemp(dir=images, prefix=f".{kind.directory}-build-"))
        build_dir.chmod(0o755)  # mkdtemp makes it 0700; the image is not secret
        try:
            _build_into(build_dir, deb_cache_dir(state_dir), progress, kind)
            _install(build_dir, tiny_image_dir(state_dir, kernel))
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    image = load_tiny_image(state_dir, kernel)
    if image is None:
        raise ImageError(f"tiny image in {tiny_image_dir(state_dir, kernel)} is unreadable "
                         "after build")
    _report(progress, 1.0, f"tiny image ready (kernel {image.kernel_release})")
    return image
