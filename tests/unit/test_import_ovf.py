"""OVF descriptors and OVA archives: a VirtualBox-style descriptor with a streamOptimized
VMDK made by qemu-img, as a folder and packed as an OVA; hostile archives refused."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput
from parvisor.importers.ovf import extract_ova, load_ovf, open_ova, parse_ovf_bytes

MiB = 1 << 20


def descriptor(href: str = "disk1.vmdk", size: int | None = None, extra_item: str = "",
               capacity: str = "64", units: str = "byte * 2^20") -> str:
    size_attr = f' ovf:size="{size}"' if size is not None else ""
    return f'''<?xml version="1.0"?>
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="file1" ovf:href="{href}"{size_attr}/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="{units}" ovf:diskId="vmdisk1"
      ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>nets</Info><Network ovf:name="NAT"/></NetworkSection>
  <VirtualSystem ovf:id="tiny">
    <Info>a VM</Info><Name>tiny-guest</Name>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>NAT</rasd:Connection><rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      {extra_item}
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>'''


@pytest.fixture
def package(tmp_path) -> Path:
    """A folder with tiny.ovf and a streamOptimized disk1.vmdk holding known data."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"BOOT" * 128 + bytes(64 * MiB - 512))
    vmdk = tmp_path / "disk1.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(raw), str(vmdk)], check=True)
    (tmp_path / "tiny.ovf").write_text(descriptor(size=vmdk.stat().st_size))
    return tmp_path


def make_ova(folder: Path, out: Path, members: list[tuple[str, bytes | None]] | None = None,
             manifest: bool = True) -> Path:
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        names = ["tiny.ovf", "disk1.vmdk"]
        entries = members if members is not None else [
            (n, (folder / n).read_bytes()) for n in names]
        if manifest and members is None:
            lines = "".join(f"SHA256({n})= {hashlib.sha256(b).hexdigest()}\n"
                            for n, b in entries)
            entries = entries + [("tiny.mf", lines.encode())]
        for name, blob in entries:
            info = tarfile.TarInfo(name)
            if blob is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return out


def test_descriptor_maps_cpu_memory_disk_and_nic(package):
    pkg = load_ovf(package / "tiny.ovf")
    d = pkg.descriptor
    assert (d.name, d.vcpus, d.memory_bytes) == ("tiny-guest", 2, 512 * MiB)
    disk = d.disks[0]
    assert (disk.href, disk.capacity_bytes, disk.qemu_format, disk.controller, disk.bus) == \
        ("disk1.vmdk", 64 * MiB, "vmdk", "sata", "ahci")
    assert [(n.network, n.model) for n in d.nics] == [("NAT", "E1000")]
    # the disk really is what the descriptor says, read by qemu-img with an explicit format
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", disk.qemu_format,
         str(pkg.files["disk1.vmdk"])], capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == disk.capacity_bytes


def test_ova_extracts_verified_files(package, tmp_path):
    ova = make_ova(package, tmp_path / "tiny.ova")
    dest = tmp_path / "out"
    dest.mkdir()
    pkg = extract_ova(ova, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["disk1.vmdk"]
    assert pkg.files["disk1.vmdk"].read_bytes() == (package / "disk1.vmdk").read_bytes()
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw",
                    str(pkg.files["disk1.vmdk"]), str(raw)], check=True)
    with open(raw, "rb") as fh:
        assert fh.read(8) == b"BOOTBOOT"


def test_ova_with_wrong_digest_leaves_nothing(package, tmp_path):
    disk = (package / "disk1.vmdk").read_bytes()
    ovf = (package / "tiny.ovf").read_bytes()
    ova = make_ova(package, tmp_path / "bad.ova", members=[
        ("tiny.ovf", ovf), ("disk1.vmdk", disk), ("tiny.mf", b"SHA256(disk1.vmdk)= 00\n")])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidInput, match="manifest digest"):
        extract_ova(ova, dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.vmdk", "/etc/evil", "sub/../../x", "a\\..\\b"])
def test_ova_path_traversal_is_refused(package, tmp_path, name):
    ova = make_ova(package, tmp_path / "t.ova",
                   members=[("tiny.ovf", b"<Envelope/>"), (name, b"x")])
    with pytest.raises(InvalidInput, match="path traversal refused"):
        open_ova(ova)


def test_ova_symlink_member_is_refused(package, tmp_path):
    ova = make_ova(package, tmp_path / "s.ova",
                   members=[("tiny.ovf", b"<Envelope/>"), ("disk1.vmdk", None)])
    with pytest.raises(InvalidInput, match="not a regular file"):
        open_ova(ova)


def test_ova_descriptor_must_come_first(package, tmp_path):
    ova = make_ova(package, tmp_path / "o.ova",
                   members=[("disk1.vmdk", b"x"), ("tiny.ovf", b"<Envelope/>")])
    with pytest.raises(InvalidInput, match="not the .ovf descriptor"):
        open_ova(ova)


def test_missing_referenced_file(package, tmp_path):
    (package / "disk1.vmdk").unlink()
    with pytest.raises(InvalidInput, match="'disk1.vmdk' is missing"):
        load_ovf(package / "tiny.ovf")
    ova = make_ova(package, tmp_path / "m.ova",
                   members=[("tiny.ovf", descriptor().encode())])
    with pytest.raises(InvalidInput, match="'disk1.vmdk' is not in the archive"):
        open_ova(ova)


def test_not_a_tar(tmp_path):
    bad = tmp_path / "x.ova"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(InvalidInput, match="not a readable tar"):
        open_ova(bad)


@pytest.mark.parametrize("href", ["http://evil/disk.vmdk", "../disk.vmdk", "/abs.vmdk",
                                  "dir/disk.vmdk"])
def test_unsafe_href_is_refused(href):
    with pytest.raises(InvalidInput, match="not a plain file name"):
        parse_ovf_bytes(descriptor(href=href).encode())


def test_malformed_and_hostile_xml():
    with pytest.raises(InvalidInput, match="malformed or truncated"):
        parse_ovf_bytes(descriptor().encode()[:300])
    bomb = b'<!DOCTYPE Envelope [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>'
    with pytest.raises(InvalidInput, match="forbidden XML construct"):
        parse_ovf_bytes(bomb)


def test_capacity_units_and_property_references():
    d = parse_ovf_bytes(descriptor(capacity="2", units="byte * 2^30").encode())
    assert d.disks[0].capacity_bytes == 2 << 30
    with pytest.raises(InvalidInput, match="not a whole number"):
        parse_ovf_bytes(descriptor(capacity="${disk.size}").encode())
    with pytest.raises(InvalidInput, match="not understood"):
        parse_ovf_bytes(descriptor(units="furlongs").encode())
