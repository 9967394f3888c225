"""VHD (fixed and dynamic) and VHDX images of a bootable guest: converted to qcow2 by
`disk convert` and booted from disk (SeaBIOS -> GRUB -> the tiny guest)."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.qemu

FORMATS = [("vpc", ["-o", "subformat=fixed"]), ("vpc", ["-o", "subformat=dynamic"]),
           ("vhdx", [])]


def test_vhd_and_vhdx_inputs_convert_and_boot(host, tiny_image, tmp_path):
    assert tiny_image.disk is not None, "the tiny image has no bootable disk"
    storage = host.state_dir / "storage"
    for index, (fmt, options) in enumerate(FORMATS):
        foreign = tmp_path / f"guest{index}.{fmt}"        # outside the roots: only read
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", fmt, *options,
                        str(tiny_image.disk), str(foreign)], check=True)
        converted = storage / f"guest{index}.qcow2"
        host.cli("disk", "convert", str(foreign), str(converted), "--source-format", fmt)
        info = host.json("disk", "info", str(converted))
        assert info["format"] == "qcow2"
        name = f"foreign{index}"
        host.cli("vm", "create", name, "--disk", str(converted), "--memory", "256M")
        host.cli("vm", "start", name)
        host.wait_agent(name, timeout=120)
        release = host.cli("vm", "exec", name, "--", "uname", "-r").stdout.strip()
        assert release == tiny_image.kernel_release
        host.cli("vm", "turn-off", name)
