"""Linked clones, templates, export and import end to end (real qemu-img, QEMU TCG).

One source VM with data on /dev/vda: a linked clone boots, sees the data, and its writes
leave the template's disk byte-identical; the template refuses to start and to be
deleted while the clone exists. An export imported under a new name boots with the
same data, with a new uuid; the original is untouched. Bad inputs change nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guest(host, name: str, script: str) -> str:
    return host.cli("vm", "exec", name, "--", "sh", "-c", script).stdout


def read(host, name: str) -> str:
    return guest(host, name, "dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null "
                             "| tr -d '\\000'").strip()


def own_disk(host, name: str) -> Path:
    return Path(next(d["path"] for d in host.vm(name)["disks"] if d["owned"]))


def refused(host, *args: str) -> str:
    done = host.cli(*args, check=False)
    assert done.returncode == 1, done.stdout
    return done.stderr


def test_linked_clone_template_and_export_import(host, tmp_path):
    host.create_tiny("src", "--disk-size", "32M")
    host.cli("vm", "start", "src")
    host.wait_agent("src")
    guest(host, "src", "echo source-data | dd of=/dev/vda bs=512 count=1 conv=sync,fsync"
                       " 2>/dev/null")
    host.cli("vm", "turn-off", "src")
    base = own_disk(host, "src")
    base_digest = sha256(base)

    host.cli("vm", "clone", "src", "lnk", "--linked")
    assert host.vm("src")["template"] and host.vm("lnk")["uuid"] != host.vm("src")["uuid"]
    host.cli("vm", "start", "lnk")
    host.wait_agent("lnk")
    assert read(host, "lnk") == "source-data"
    guest(host, "lnk", "echo clone-data | dd of=/dev/vda bs=512 count=1 conv=sync,fsync"
                       " 2>/dev/null")
    assert read(host, "lnk") == "clone-data"
    host.cli("vm", "turn-off", "lnk")
    assert sha256(base) == base_digest                          # template unchanged
    assert "template" in refused(host, "vm", "start", "src")
    assert "parent of" in refused(host, "vm", "delete", "src")
    assert "already exists" in refused(host, "vm", "clone", "src", "lnk")
    assert "not allowed" in refused(host, "vm", "clone", "src", "x/y")

    export = tmp_path / "exp"
    host.cli("vm", "export", "src", str(export))
    manifest = json.loads((export / "parvisor-export.json").read_text())
    assert manifest["format_version"] == 1 and manifest["definition"]["name"] == "src"
    assert "not empty" in refused(host, "vm", "export", "src", str(export))
    host.cli("vm", "import", str(export), "--name", "imp")
    assert host.vm("imp")["uuid"] != host.vm("src")["uuid"]
    assert own_disk(host, "imp").parent != export               # copied into its folder
    host.cli("vm", "start", "imp")
    host.wait_agent("imp")
    assert read(host, "imp") == "source-data"
    host.cli("vm", "turn-off", "imp")
    assert sha256(base) == base_digest                          # the original untouched
    assert "already exists" in refused(host, "vm", "import", str(export), "--name", "imp")

    host.cli("vm", "delete", "lnk")                             # no clone left:
    host.cli("vm", "start", "src")                              # the template may start
    assert not host.vm("src")["template"]
    host.cli("vm", "turn-off", "src")


def test_import_refuses_damaged_and_newer_exports(host, tmp_path):
    host.create_tiny("orig", "--disk-size", "16M")
    export = tmp_path / "exp"
    host.cli("vm", "export", "orig", str(export))
    disk = next((export / "disks").glob("*.qcow2"))
    with disk.open("r+b") as handle:                            # flip bytes in the data
        handle.seek(disk.stat().st_size - 100)
        handle.write(b"tampered")
    assert "damaged or was changed" in refused(host, "vm", "import", str(export),
                                               "--name", "bad")
    manifest_path = export / "parvisor-export.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    assert "newer" in refused(host, "vm", "import", str(export), "--name", "bad")
    manifest_path.write_text("{not json")
    assert "not valid JSON" in refused(host, "vm", "import", str(export), "--name", "bad")
    assert "storage roots" in refused(host, "vm", "import", str(export), "--in-place")
    assert [vm["name"] for vm in host.json("vm", "list")] == ["orig"]   # nothing registered
    assert not list((host.state_dir / "storage" / "vms").glob("*/*.partial*"))
