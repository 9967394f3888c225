"""Fast tests of the tiny image builder: no network, no QEMU, no apt."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from parvisor.errors import ImageError
from parvisor.image import tiny
from parvisor.image.tiny import (CpioTree, Package, TinyImage, build_tiny_image,
                                 config_is_module, load_tiny_image, module_name,
                                 parse_kernel_depends, parse_ldd, parse_modules_dep,
                                 read_module, resolve_module_order, tiny_image_dir,
                                 uncompressed_module_path, write_initrd)

FAKE_MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz \
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz \
kernel/drivers/virtio/virtio.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz \
kernel/drivers/net/net_failover.ko.xz kernel/drivers/virtio/virtio.ko.xz \
kernel/net/core/failover.ko.xz
kernel/drivers/char/hw_random/virtio-rng.ko.zst: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/acpi/button.ko:
"""


# --- module order -----------------------------------------------------------------------

def _table() -> dict:
    # modules.dep continuation lines are joined here only for readability of the fixture.
    return parse_modules_dep(FAKE_MODULES_DEP.replace("\\\n", ""))


def test_module_name_strips_dir_suffix_and_dashes() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.zst") == "virtio_rng"
    assert module_name("kernel/drivers/acpi/button.ko") == "button"
    assert module_name("a/b/virtio_net.ko.xz") == "virtio_net"


def test_dependencies_come_before_their_users_once_each() -> None:
    order = resolve_module_order(_table(), ["virtio_pci", "virtio_net", "button"])
    names = [module_name(p) for p in order]
    assert len(names) == len(set(names))
    assert set(names) == {"virtio", "virtio_ring", "virtio_pci_modern_dev",
                          "virtio_pci_legacy_dev", "virtio_pci", "failover",
                          "net_failover", "virtio_net", "button"}
    pos = names.index
    assert pos("virtio") < pos("virtio_ring") < pos("virtio_pci")
    assert pos("failover") < pos("net_failover") < pos("virtio_net")
    assert pos("virtio_ring") < pos("virtio_net")


def test_dashed_wanted_name_and_order_is_deterministic() -> None:
    first = resolve_module_order(_table(), ["virtio-rng", "virtio_net"])
    assert first == resolve_module_order(_table(), ["virtio-rng", "virtio_net"])
    assert first[-1].endswith("virtio_net.ko.xz")


def test_missing_module_raises_image_error() -> None:
    with pytest.raises(ImageError, match="virtio_mem"):
        resolve_module_order(_table(), ["virtio_mem"])


def test_missing_dependency_names_the_user() -> None:
    table = parse_modules_dep("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(ImageError, match="b .*needed by a"):
        resolve_module_order(table, ["a"])


def test_dependency_cycle_raises() -> None:
    table = parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(ImageError, match="cycle"):
        resolve_module_order(table, ["a"])


def test_config_is_module() -> None:
    config = "CONFIG_ACPI_BUTTON=m\nCONFIG_INPUT_EVDEV=y\n# CONFIG_FOO is not set\n"
    assert config_is_module(config, "CONFIG_ACPI_BUTTON")
    assert not config_is_module(config, "CONFIG_INPUT_EVDEV")
    assert not config_is_module(config, "CONFIG_FOO")


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    payload = b"\x7fELF fake module"
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(payload))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c.ko").write_bytes(payload)
    for name in ("a.ko.xz", "b.ko.gz", "c.ko"):
        assert read_module(tmp_path / name) == payload
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", "-o", str(tmp_path / "d.ko.zst"), str(tmp_path / "c.ko")],
                       check=True)
        assert read_module(tmp_path / "d.ko.zst") == payload
    assert uncompressed_module_path("kernel/x/y.ko.zst") == "kernel/x/y.ko"
    assert uncompressed_module_path("kernel/x/y.ko") == "kernel/x/y.ko"


# --- packages and tools -----------------------------------------------------------------

def test_parse_kernel_depends() -> None:
    out = ("linux-image-cloud-amd64\n"
           "  Depends: linux-image-6.1.0-56-cloud-amd64\n")
    assert parse_kernel_depends(out) == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(ImageError):
        parse_kernel_depends("linux-image-cloud-amd64\n")


def test_deb_name_encodes_the_epoch() -> None:
    pkg = Package("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64")
    assert pkg.deb_name == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"


def test_cached_deb_is_not_downloaded_again(tmp_path: Path, monkeypatch) -> None:
    pkg = Package("qemu-guest-agent", "1:7.2", "amd64")
    (tmp_path / pkg.deb_name).write_bytes(b"deb")

    def no_tools(*args, **kwargs):
        raise AssertionError("must not run apt-get for a cached .deb")
    monkeypatch.setattr(tiny, "run_tool", no_tools)
    assert tiny.fetch_deb(pkg, tmp_path) == tmp_path / pkg.deb_name


def test_flavours_pick_kernel_packages_and_the_signed_loaders(monkeypatch) -> None:
    releases = {"linux-image-cloud-amd64": "linux-image-6.1.0-56-cloud-amd64",
                "linux-image-amd64": "linux-image-6.1.0-56-amd64"}

    def apt_cache(cmd, what, **kwargs):
        assert cmd[:2] == ["apt-cache", "depends"]
        return f"{cmd[2]}\n  Depends: {releases[cmd[2]]}\n"
    monkeypatch.setattr(tiny, "run_tool", apt_cache)
    cloud = tiny.package_names(tiny.flavour("cloud"))
    assert cloud["kernel"] == "linux-image-6.1.0-56-cloud-amd64"
    assert (cloud["shim"], cloud["grub"]) == ("shim-signed", "grub-efi-amd64-signed")
    generic = tiny.package_names(tiny.flavour("generic"))
    assert generic["kernel"] == "linux-image-6.1.0-56-amd64"
    assert "shim" not in generic and "grub" not in generic    # no boot disk
    assert "e1000" in tiny.flavour("generic").extra_modules
    assert tiny.tiny_image_dir(Path("/s"), "generic") == Path("/s/images/tiny-generic")
    with pytest.raises(ImageError, match="unknown tiny image kernel"):
        tiny.flavour("rt")


def test_missing_signed_loader_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "shim" / tiny.SIGNED_SHIM_FILE).parent.mkdir(parents=True)
    (tmp_path / "shim" / tiny.SIGNED_SHIM_FILE).write_bytes(b"shim")
    unpacked = tiny.Unpacked(tmp_path, tmp_path, tmp_path, "6.1", shim_root=tmp_path / "shim",
                             grub_root=tmp_path / "grub")
    with pytest.raises(ImageError, match="grub-efi-amd64-signed has no grubx64.efi.signed"):
        unpacked.signed_loaders()
    with pytest.raises(ImageError, match="not unpacked"):
        tiny.Unpacked(tmp_path, tmp_path, tmp_path, "6.1").signed_loaders()


def test_generic_flavour_builds_into_its_own_dir(tmp_path: Path, monkeypatch) -> None:
    kinds = []
    monkeypatch.setattr(tiny, "_build_into",
                        lambda d, c, p, kind: (kinds.append(kind.name), fake_build(d, c, p)))
    image = build_tiny_image(tmp_path, kernel="generic")
    assert kinds == ["generic"] and image.kernel.parent == tmp_path / "images/tiny-generic"
    assert load_tiny_image(tmp_path) is None        # the default flavour is separate
    assert load_tiny_image(tmp_path, "generic") == image


def test_run_tool_error_carries_stderr() -> None:
    with pytest.raises(ImageError, match="doing x.*exited 3: boom"):
        tiny.run_tool(["sh", "-c", "echo boom >&2; exit 3"], "doing x")


def test_parse_ldd() -> None:
    out = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
           "\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007f12)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x00007f34)\n")
    assert parse_ldd(out) == ["/lib/x86_64-linux-gnu/libglib-2.0.so.0",
                              "/lib64/ld-linux-x86-64.so.2"]
    with pytest.raises(ImageError, match="libnuma"):
        parse_ldd("\tlibnuma.so.1 => not found\n")


# --- cpio -------------------------------------------------------------------------------

def read_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """(name, mode, data, rdevmajor, rdevminor) of each entry of a newc archive."""
    entries, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        name_end = pos + 110 + f[11] - 1
        name = data[pos + 110:name_end].decode()
        pos = (name_end + 1 + 3) & ~3
        body = data[pos:pos + f[6]]
        pos = (pos + f[6] + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append((name, f[1], body, f[9], f[10]))


def sample_tree() -> CpioTree:
    tree = CpioTree()
    tree.add_file("usr/sbin/qemu-ga", b"binary", 0o755)
    tree.add_symlink("bin/sh", "/bin/busybox")
    tree.add_chardev("dev/console", 5, 1)
    tree.add_file("init", b"#!/bin/sh\n", 0o755)
    tree.add_dir("proc")
    return tree


def test_cpio_has_parents_first_and_right_types() -> None:
    out = io.BytesIO()
    sample_tree().write(out)
    entries = read_newc(out.getvalue())
    names = [e[0] for e in entries]
    assert names == sorted(names)
    assert {"usr", "usr/sbin", "bin", "dev"} <= set(names)
    by_name = {e[0]: e for e in entries}
    assert stat.S_ISREG(by_name["usr/sbin/qemu-ga"][1]) and by_name["usr/sbin/qemu-ga"][2] == b"binary"
    assert by_name["usr/sbin/qemu-ga"][1] & 0o777 == 0o755
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][2] == b"/bin/busybox"
    assert stat.S_ISCHR(by_name["dev/console"][1]) and by_name["dev/console"][3:] == (5, 1)
    assert stat.S_ISDIR(by_name["proc"][1])


def test_initrd_is_deterministic(tmp_path: Path) -> None:
    write_initrd(sample_tree(), tmp_path / "a.img")
    write_initrd(sample_tree(), tmp_path / "b.img")
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    names = [e[0] for e in read_newc(gzip.decompress((tmp_path / "a.img").read_bytes()))]
    assert "init" in names


# --- guest scripts --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["init", "parvisor-power", "shutdown", "udhcpc.script"])
def test_guest_scripts_parse(name: str, tmp_path: Path) -> None:
    shell = shutil.which("busybox")
    script = tmp_path / name
    script.write_bytes(tiny.guest_file_bytes(name))
    argv = [shell, "sh", "-n", str(script)] if shell else ["sh", "-n", str(script)]
    assert subprocess.run(argv, capture_output=True).returncode == 0


def test_ready_line_is_the_first_thing_init_prints() -> None:
    lines = tiny.guest_file_bytes("init").decode().splitlines()
    commands = [l for l in lines if l.strip() and not l.startswith("#")]
    assert commands[0] == 'echo "parvisor-guest: userspace ready"'


def test_guest_os_release() -> None:
    text = tiny.guest_file_bytes("os-release").decode()
    assert "ID=parvisor-tiny" in text.splitlines()
    assert 'PRETTY_NAME="parvisor tiny guest"' in text


# --- manifest and caching ---------------------------------------------------------------

def fake_build(build_dir: Path, cache_dir: Path, progress, kind=None) -> None:
    """Stand-in for the real download/unpack/assemble: writes a valid image."""
    for name, content in (("vmlinuz", b"kernel"), ("initrd.img", b"initrd")):
        (build_dir / name).write_bytes(content)
    files = {n: {"sha256": tiny.sha256_file(build_dir / n),
                 "size": (build_dir / n).stat().st_size} for n in tiny.IMAGE_FILES}
    (build_dir / "manifest.json").write_text(json.dumps({
        "format_version": tiny.FORMAT_VERSION, "kernel_release": "6.1.0-test",
        "cmdline": tiny.CMDLINE, "packages": {}, "modules": [],
        "guest_files_sha256": tiny.guest_files_digest(), "files": files}))


@pytest.fixture
def built(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(tiny, "_build_into", fake_build)
    build_tiny_image(tmp_path)
    return tmp_path


def test_load_returns_none_when_not_built(tmp_path: Path) -> None:
    assert load_tiny_image(tmp_path) is None


def test_build_then_load(built: Path) -> None:
    image = load_tiny_image(built)
    d = tiny_image_dir(built)
    assert image == TinyImage(d / "vmlinuz", d / "initrd.img", tiny.CMDLINE, "6.1.0-test")
    assert "console=ttyS0" in image.cmdline
    assert not list((built / "images").glob(".tiny-build-*"))


@pytest.mark.parametrize("damage", ["corrupt_json", "missing_file", "changed_file",
                                    "old_format", "stale_guest_files"])
def test_damaged_or_stale_image_is_not_loaded(built: Path, damage: str) -> None:
    d = tiny_image_dir(built)
    manifest = json.loads((d / "manifest.json").read_text())
    if damage == "corrupt_json":
        (d / "manifest.json").write_text("{not json")
    elif damage == "missing_file":
        (d / "initrd.img").unlink()
    elif damage == "changed_file":
        (d / "vmlinuz").write_bytes(b"kernes")  # same size, different content
    else:
        key = "format_version" if damage == "old_format" else "guest_files_sha256"
        manifest[key] = "old"
        (d / "manifest.json").write_text(json.dumps(manifest))
    assert load_tiny_image(built) is None


def test_cached_image_is_reused_and_force_rebuilds(built: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(tiny, "_build_into", lambda *a: (calls.append(a), fake_build(*a)))
    build_tiny_image(built)
    assert calls == []
    progress = []
    build_tiny_image(built, force=True, progress=lambda f, m: progress.append((f, m)))
    assert len(calls) == 1
    assert progress[-1][0] == 1.0


def test_interrupted_build_keeps_old_image_and_leaves_no_temp(built: Path,
                                                              monkeypatch) -> None:
    def failing_build(build_dir: Path, cache_dir: Path, progress, kind=None) -> None:
        (build_dir / "vmlinuz").write_bytes(b"half")
        raise ImageError("download failed")
    monkeypatch.setattr(tiny, "_build_into", failing_build)
    with pytest.raises(ImageError, match="download failed"):
        build_tiny_image(built, force=True)
    assert load_tiny_image(built) is not None
    assert (tiny_image_dir(built) / "vmlinuz").read_bytes() == b"kernel"
    assert not list((built / "images").glob(".tiny-*"))


def test_cache_dir_env_override(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(tiny.CACHE_ENV, raising=False)
    assert tiny.deb_cache_dir(tmp_path) == tmp_path / "images" / "cache"
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path / "shared"))
    assert tiny.deb_cache_dir(tmp_path) == tmp_path / "shared"
