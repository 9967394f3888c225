"""VHD (fixed and dynamic) and VHDX images of a bootable guest: converted to qcow2 by
`disk convert` and booted from disk (SeaBIOS -> GRUB -> the tiny guest).

CI boots the dynamic VHD (the common Virtual PC / Virtual Server format) and checks that
the fixed VHD and the VHDX convert to the same guest-visible bytes as the original disk
(`qemu-img compare`); the slow tier boots all three."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.qemu

FIXED_VHD = ("vpc", ["-o", "subformat=fixed"])
DYNAMIC_VHD = ("vpc", ["-o", "subformat=dynamic"])
VHDX = ("vhdx", [])


def _convert(host, tiny_image, tmp_path, index: int, fmt: str, options: list[str]):
    foreign = tmp_path / f"guest{index}.{fmt}"        # outside the roots: only read
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", fmt, *options,
                    str(tiny_image.disk), str(foreign)], check=True)
    converted = host.state_dir / "storage" / f"guest{index}.qcow2"
    host.cli("disk", "convert", str(foreign), str(converted), "--source-format", fmt)
    assert host.json("disk", "info", str(converted))["format"] == "qcow2"
    return converted


def _boots(host, tiny_image, name: str, disk) -> None:
    host.cli("vm", "create", name, "--disk", str(disk), "--memory", "256M")
    host.cli("vm", "start", name)
    host.wait_agent(name, timeout=120)
    release = host.cli("vm", "exec", name, "--", "uname", "-r").stdout.strip()
    assert release == tiny_image.kernel_release
    host.cli("vm", "turn-off", name)


def test_vhd_boots_and_fixed_vhd_and_vhdx_convert_to_the_same_disk(host, tiny_image,
                                                                     tmp_path):
    assert tiny_image.disk is not None, "the tiny image has no bootable disk"
    _boots(host, tiny_image, "foreign1",
           _convert(host, tiny_image, tmp_path, 1, *DYNAMIC_VHD))
    for index, (fmt, options) in ((0, FIXED_VHD), (2, VHDX)):
        converted = _convert(host, tiny_image, tmp_path, index, fmt, options)
        same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(tiny_image.disk), str(converted)],
                              capture_output=True, text=True)
        assert same.returncode == 0, f"{fmt} {options}: {same.stdout}{same.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("index,fmt,options", [(0, *FIXED_VHD), (2, *VHDX)],
                         ids=["fixed-vhd", "vhdx"])
def test_fixed_vhd_and_vhdx_boot(host, tiny_image, tmp_path, index, fmt, options):
    _boots(host, tiny_image, f"foreign{index}",
           _convert(host, tiny_image, tmp_path, index, fmt, options))
