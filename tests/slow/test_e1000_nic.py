"""The emulated legacy adapter (e1000) carries traffic in a guest (slow tier: builds the
tiny image's generic-kernel flavour once, ~1.5 min, and boots two guests).

The tiny guest's cloud kernel has no e1000 driver; the generic flavour
(``build_tiny_image(..., kernel="generic")``) loads it. One VM on an e1000 NIC and one
on virtio-net, both on a private switch, ping each other."""

from __future__ import annotations

import secrets
import shutil

import pytest

from parvisor.image.tiny import build_tiny_image
from parvisor.testing.guest_fixtures import test_image_dir

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


@pytest.fixture(scope="module")
def generic_image():
    return build_tiny_image(test_image_dir(), kernel="generic")


def guest(host, name: str, *argv: str, check: bool = True):
    return host.cli("vm", "exec", name, "--", *argv, check=check)


def test_an_e1000_vm_and_a_virtio_vm_ping_each_other(host, generic_image):
    switch = f"e1k{secrets.token_hex(3)}"
    host.cli("switch", "create", switch, "--type", "private")
    # a --kernel VM's files must sit in a storage root
    boot_dir = host.state_dir / "storage" / "generic"
    boot_dir.mkdir(parents=True)
    for source in (generic_image.kernel, generic_image.initrd):
        shutil.copyfile(source, boot_dir / source.name)
    host.cli("vm", "create", "legacy", "--kernel", str(boot_dir / "vmlinuz"),
             "--initrd", str(boot_dir / "initrd.img"), "--cmdline", generic_image.cmdline,
             "--nic", f"{switch},model=e1000")
    host.create_tiny("synthetic", "--nic", switch)
    for name in ("legacy", "synthetic"):
        host.cli("vm", "start", name)
    for name, address in (("legacy", "10.78.0.1/24"), ("synthetic", "10.78.0.2/24")):
        host.wait_agent(name, timeout=180)
        guest(host, name, "ip", "addr", "add", address, "dev", "eth0")
        guest(host, name, "ip", "link", "set", "eth0", "up")
    # the legacy VM's eth0 is driven by e1000, not virtio_net
    driver = guest(host, "legacy", "readlink", "/sys/class/net/eth0/device/driver").stdout
    assert driver.strip().endswith("/e1000"), driver
    assert guest(host, "legacy", "ping", "-c", "3", "-W", "5", "10.78.0.2",
                 check=False).returncode == 0
    assert guest(host, "synthetic", "ping", "-c", "3", "-W", "5", "10.78.0.1",
                 check=False).returncode == 0
