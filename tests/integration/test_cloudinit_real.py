"""cloud-init NoCloud seed end to end: ``vm create --cloud-init FILE --ssh-key KEY``
attaches a read-only ``cidata`` CD that the tiny guest can mount and read."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.qemu

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvP test@pv"


def test_guest_sees_the_seed_with_meta_and_user_data(host, tmp_path):
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\npackages: [htop]\n")
    vm = host.create_tiny("seeded", "--cloud-init", str(user_data), "--ssh-key", KEY)
    seed = [d for d in vm["disks"] if d["media"] == "cdrom"]
    assert seed and seed[0]["readonly"] and seed[0]["bus"] == "virtio-scsi"
    host.cli("vm", "start", "seeded")
    host.wait_agent("seeded")
    script = ("mkdir -p /mnt/seed && mount -t iso9660 -o ro /dev/sr0 /mnt/seed && "
              "cat /mnt/seed/meta-data && echo ==== && cat /mnt/seed/user-data && "
              "echo ==== && cat /sys/block/sr0/device/model")
    out = host.cli("vm", "exec", "seeded", "--", "sh", "-c", script).stdout
    meta, user, _ = out.split("====\n")
    assert f'instance-id: "{vm["uuid"]}"' in meta and 'local-hostname: "seeded"' in meta
    assert "packages: [htop]" in user and KEY in user and "merge_how" in user
    label = host.cli("vm", "exec", "seeded", "--", "sh", "-c",
                     "dd if=/dev/sr0 bs=1 skip=32808 count=6 2>/dev/null").stdout
    assert label == "cidata"      # the ISO 9660 volume id NoCloud looks for
    host.cli("vm", "turn-off", "seeded")
