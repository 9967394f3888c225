"""The import wiring without a service: format sniffing, source validation, conversion
of VHD chains with real qemu-img (contents and progress), staging cleanup, and the
preparation step's refusals against a fake host (nothing written, no job)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from parvisor.cli.import_commands import switch_map
from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.importers.convert import (
    convert_to_qcow2, sniff_format, validate_source, vhd_source)
from parvisor.importers.vhd import read_vhd
from parvisor.ops import imports
from parvisor.ops.import_plans import HostView, prepare_disk, prepare_vmc
from parvisor.ops.import_requests import ImportDisk, ImportVmc
from parvisor.testing.vhd_writer import ParentRef, write_vhd

MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def raw_bytes(image: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("fmt,args", [("vpc", ["-o", "subformat=fixed"]),
                                      ("vpc", ["-o", "subformat=dynamic"]),
                                      ("qcow2", []), ("vmdk", []), ("vhdx", []), ("raw", [])])
def test_sniff_format_by_magic(tmp_path, fmt, args):
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, *args, str(path), "4M")
    assert sniff_format(path) == fmt


def test_descriptor_vmdk_naming_host_files_is_refused(tmp_path):
    vmdk = tmp_path / "evil.vmdk"
    vmdk.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                    'RW 8 FLAT "/etc/passwd" 0\n')
    with pytest.raises(InvalidInput, match="descriptor VMDK"):
        validate_source(vmdk, "vmdk", [tmp_path])


def test_qcow2_source_with_backing_outside_roots_is_refused(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    qemu_img("create", "-f", "qcow2", str(outside / "base.qcow2"), "4M")
    qemu_img("create", "-f", "qcow2", "-b", str(outside / "base.qcow2"), "-F", "qcow2",
             str(inside / "top.qcow2"))
    with pytest.raises(InvalidInput, match="outside the storage roots"):
        validate_source(inside / "top.qcow2", "qcow2", [inside])


def test_differencing_chain_converts_to_the_flattened_disk(tmp_path):
    base_data = {0: b"B" * 512, 3 * MiB: b"b" * 1024}
    base_uuid = write_vhd(tmp_path / "base.vhd", size=8 * MiB, data=base_data)
    write_vhd(tmp_path / "child.vhd", size=8 * MiB, disk_type="differencing",
              data={512: b"C" * 512, 3 * MiB: b"c" * 512},
              parent=ParentRef(base_uuid, "base.vhd", [("W2ru", ".\\base.vhd")]))
    source = vhd_source(tmp_path / "child.vhd", [tmp_path])
    fractions: list[float] = []
    size = convert_to_qcow2(source, tmp_path / "out.qcow2", tmp_path, fractions.append)
    assert size == read_vhd(tmp_path / "child.vhd").virtual_size
    data = raw_bytes(tmp_path / "out.qcow2", "qcow2", tmp_path)
    assert data[:1024] == b"B" * 512 + b"C" * 512               # base, then child
    assert data[3 * MiB:3 * MiB + 1024] == b"c" * 512 + b"b" * 512
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert sorted(p.name for p in tmp_path.iterdir() if "flat" in p.name) == []


def test_fixed_vhd_converts_without_its_footer(tmp_path):
    vhd = tmp_path / "fixed.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", str(vhd), "4M")
    source = validate_source(vhd, "vpc", [tmp_path])
    assert convert_to_qcow2(source, tmp_path / "f.qcow2", tmp_path) == source.virtual_size


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    base = tmp_path / imports.STAGING_DIR
    me, host = os.getpid(), socket.gethostname()
    dead = base / f"{host}-999999999-aaaa"
    mine_active = imports.new_staging(tmp_path)
    mine_stale = base / f"{host}-{me}-bbbb"
    other_host = base / f"another-host-1-cccc"
    for folder in (dead, mine_stale, other_host):
        folder.mkdir(parents=True)
        (folder / "disk0.qcow2").write_bytes(b"x")
    removed = imports.clean_stale_staging((tmp_path,))
    assert sorted(removed) == sorted([dead, mine_stale])
    assert mine_active.exists() and other_host.exists()
    imports.drop_staging(mine_active)
    assert not mine_active.exists()


def test_switch_map_option():
    assert switch_map(["sw0", "Local only=lan"]) == {"*": "sw0", "Local only": "lan"}
    with pytest.raises(InvalidInput):
        switch_map(["=sw0"])


# --- preparation against a fake host: refusals change nothing ------------------------------------
class FakeStore:
    def __init__(self, names=()):
        self.names = set(names)

    def get_vm(self, name):
        if name not in self.names:
            raise NotFound(name)
        return SimpleNamespace(name=name)

    def get_vm_by_uuid(self, uuid):
        raise NotFound(uuid)

    def list_vms(self):
        return []


class FakeSwitches:
    def get(self, name):
        if name != "lan":
            raise NotFound(name)


def fake_host(tmp_path, names=()) -> HostView:
    root = tmp_path / "storage"
    root.mkdir(exist_ok=True)
    return HostView((root,), FakeStore(names), FakeSwitches())


def vmc(folder: Path, disk: str, nic_count: int = 1) -> Path:
    xml = ('<preferences><hardware><memory><ram_size type="integer">64</ram_size>'
           f'</memory><pci_bus><ethernet_adapter><controller_count type="integer">'
           f'{nic_count}</controller_count><ethernet_controller id="0"><virtual_network>'
           '<name type="string">Office</name></virtual_network><ethernet_card_address '
           'type="bytes">000000000000</ethernet_card_address></ethernet_controller>'
           '</ethernet_adapter><ide_adapter><ide_controller id="0"><location id="0">'
           '<drive_type type="integer">1</drive_type><pathname><relative type="string">'
           f'{disk}</relative></pathname></location></ide_controller></ide_adapter>'
           '</pci_bus></hardware></preferences>')
    path = folder / "old.vmc"
    path.write_bytes(b"\xff\xfe" + xml.encode("utf-16-le"))
    return path


def test_prepare_vmc_builds_the_definition_without_writing(tmp_path):
    write_vhd(tmp_path / "d.vhd", size=8 * MiB, disk_type="dynamic")
    host = fake_host(tmp_path)
    prepared = prepare_vmc(host, ImportVmc(path=str(vmc(tmp_path, "d.vhd")),
                                           switches={"Office": "lan"}))
    definition = prepared.definition
    assert definition.name == "old" and definition.disks[0].owned
    assert definition.nics[0].mac.startswith("02:70:76")       # dynamic MAC: allocated
    assert prepared.disks[0].target == host.roots[0] / "vms" / definition.uuid / "disk0.qcow2"
    assert list(host.roots[0].iterdir()) == []                   # nothing written


def test_prepare_refuses_missing_switch_taken_name_and_relative_path(tmp_path):
    write_vhd(tmp_path / "d.vhd", size=8 * MiB, disk_type="dynamic")
    path = str(vmc(tmp_path, "d.vhd"))
    with pytest.raises(InvalidInput, match="switch 'Office', which does not exist"):
        prepare_vmc(fake_host(tmp_path), ImportVmc(path=path))
    with pytest.raises(AlreadyExists, match="already exists"):
        prepare_vmc(fake_host(tmp_path, {"old"}), ImportVmc(path=path, switches={"*": "lan"}))
    with pytest.raises(InvalidInput, match="must be absolute"):
        prepare_disk(fake_host(tmp_path), ImportDisk(path="d.vhd", name="p2v"))
