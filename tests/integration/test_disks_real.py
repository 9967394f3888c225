"""Disks end to end with real qemu-img and real QEMU (TCG), driven through the CLI.

One VM carries every case, to keep the CI budget: its first data disk (/dev/vda) is a
differencing child over a base, its second (/dev/vdb) a new empty disk that parvisor
creates and deletes with the VM, plus a CD drive that gets ejected and re-inserted
while the guest runs. Two boots prove that guest writes survive turn-off and start.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guest(host, name: str, script: str) -> str:
    return host.cli("vm", "exec", name, "--", "sh", "-c", script).stdout


def read_sector(host, name: str, device: str) -> str:
    return guest(host, name, f"dd if={device} bs=512 count=1 2>/dev/null | tr -d '\\000'")


def test_disks_differencing_new_disk_cdrom_and_persistence(host):
    root = host.state_dir / "storage"
    root.mkdir(exist_ok=True)
    base, child, iso = root / "base.qcow2", root / "child.qcow2", root / "tools.iso"
    host.cli("disk", "create", str(base), "--size", "16M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 512", str(base)],
                   check=True, capture_output=True)      # 512 x 'b' from the base
    base_digest = sha256(base)
    info = host.json("disk", "create", str(child), "--parent", str(base))
    assert [link["path"] for link in info["chain"]] == [str(base)]
    iso.write_bytes(b"\0" * (1 << 20))

    host.create_tiny("dsk", "--disk", str(child), "--disk-size", "32M", "--cdrom", str(iso))
    own_disk = Path(next(d["path"] for d in host.vm("dsk")["disks"] if d["owned"]))
    assert own_disk.is_file() and own_disk.is_relative_to(root)
    host.cli("vm", "start", "dsk")
    host.wait_agent("dsk")
    assert read_sector(host, "dsk", "/dev/vda") == "b" * 512      # the base shows through
    guest(host, "dsk", "echo child-data | dd of=/dev/vda bs=512 count=1 conv=sync 2>/dev/null"
          " && echo new-disk | dd of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null && sync")
    host.cli("vm", "cdrom", "eject", "dsk")                   # QMP on the running VM
    assert next(d for d in host.vm("dsk")["disks"] if d["id"] == "cd0")["path"] is None
    host.cli("vm", "cdrom", "insert", "dsk", str(iso))
    assert any(d["path"] == str(iso) for d in host.vm("dsk")["disks"])

    host.cli("vm", "turn-off", "dsk")
    host.cli("vm", "start", "dsk")
    host.wait_agent("dsk")
    assert read_sector(host, "dsk", "/dev/vda").strip() == "child-data"
    assert read_sector(host, "dsk", "/dev/vdb").strip() == "new-disk"
    host.cli("vm", "turn-off", "dsk")

    assert sha256(base) == base_digest                         # the base never changed
    refused = host.cli("disk", "delete", str(base), check=False)
    assert refused.returncode == 1 and "parent of" in refused.stderr
    host.cli("vm", "delete", "dsk")
    assert not own_disk.exists()                               # the VM's own disk went
    assert child.exists() and base.exists()                    # user-given disks stay


def test_disk_commands_bad_input_and_stopped_vm_media(host, tmp_path):
    root = host.state_dir / "storage"
    root.mkdir(exist_ok=True)
    vhd = tmp_path / "import.vhd"                    # sources may be outside the roots
    subprocess.run(["qemu-img", "create", "-f", "vpc", "-o", "subformat=fixed", str(vhd),
                    "8M"], check=True, capture_output=True)
    expected = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc",
                                          str(vhd)], check=True, capture_output=True,
                                         text=True).stdout)["virtual-size"]
    info = host.json("disk", "convert", str(vhd), str(root / "import.qcow2"))
    assert (info["format"], info["virtual_size"]) == ("qcow2", expected)
    host.json("disk", "resize", str(root / "import.qcow2"), "16M")
    for args, words in (
            (("disk", "create", str(tmp_path / "x.qcow2"), "--size", "1M"), "outside"),
            (("disk", "resize", str(root / "import.qcow2"), "1M"), "shrink"),
            (("disk", "create", str(root / "import.qcow2"), "--size", "1M"), "exists"),
            (("vm", "create", "v", "--image", "tiny", "--disk-size", "1M,bus=floppy"), "bus"),
            (("vm", "create", "v", "--image", "tiny", "--disk", str(vhd)), "outside")):
        done = host.cli(*args, check=False)
        assert done.returncode == 1 and words in done.stderr.lower(), (args, done.stderr)
    assert sorted(p.name for p in root.iterdir()) == ["import.qcow2"]

    iso = root / "a.iso"
    iso.write_bytes(b"\0" * 4096)
    host.create_tiny("media", "--disk-size", "1M")
    host.cli("vm", "cdrom", "insert", "media", str(iso))     # stopped: adds a drive
    host.cli("vm", "set", "media", "--boot-order", "cd0,disk0")
    vm = host.vm("media")
    assert vm["boot_order"] == ["cd0", "disk0"]
    assert [(d["id"], d["media"], d["path"]) for d in vm["disks"]][1] == ("cd0", "cdrom",
                                                                          str(iso))
    host.cli("vm", "cdrom", "eject", "media")
    assert host.vm("media")["disks"][1]["path"] is None
