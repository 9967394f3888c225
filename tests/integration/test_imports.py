"""Imports end to end with real qemu-img and real QEMU (TCG), driven through the CLI.

The guest is the tiny image's bootable disk (GRUB on GPT, SeaBIOS boots it from IDE,
AHCI or virtio), turned into the foreign formats by qemu-img: a dynamic VHD with a
differencing child written from the spec (``vhd_writer``) behind a generated .vmc; a
streamOptimized VMDK behind an OVF descriptor, also packed as an OVA; a raw disk for
P2V. Sources live in tmp_path, outside the storage roots (imports only read them).
Bad input must leave no VM and no file in the storage root; a SIGKILL during
conversion leaves only the staging folder, which the next start removes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from parvisor.importers.vhd import read_vhd
from parvisor.testing.host_fixture import PARVISOR
from parvisor.testing.vhd_writer import ParentRef, write_vhd

SAMPLE = Path("/work/shared/samples/virtualpc2007-mosa.vmc")
GUID = "{0B6D4C5A-2E6F-4B8C-9A1D-3C5E7F901234}"
CHILD_SECTOR = 4000                # inside the BIOS boot partition, after GRUB's core.img
CHILD_BYTE = 0x5A


# --- fixtures made from the published formats ------------------------------------------------
def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def tiny_disk(tiny_image) -> Path:
    if tiny_image.disk is None:
        pytest.skip("the tiny image has no bootable disk (rebuild it)")
    return tiny_image.disk


def vmc_text(disk_rel: str, *, mac: str = "0003FFB186A1", nic_count: int = 1) -> str:
    return ('<?xml version="1.0" encoding="UTF-16"?>\r\n<preferences>'
            '<version type="string">2.0</version><hardware>'
            '<memory><ram_size type="integer">256</ram_size></memory><pci_bus>'
            f'<ethernet_adapter><controller_count type="integer">{nic_count}'
            '</controller_count><ethernet_controller id="0"><virtual_network>'
            '<name type="string">Local only</name></virtual_network>'
            f'<ethernet_card_address type="bytes">{mac}</ethernet_card_address>'
            '</ethernet_controller></ethernet_adapter><ide_adapter>'
            '<ide_controller id="0"><location id="0"><drive_type type="integer">1'
            f'</drive_type><pathname><absolute type="string">C:\\VMs\\{disk_rel}</absolute>'
            f'<relative type="string">.\\{disk_rel}</relative></pathname></location>'
            '</ide_controller></ide_adapter></pci_bus><bios><bios_guid type="string">'
            f'{GUID}</bios_guid></bios></hardware></preferences>')


def write_vmc(folder: Path, disk_rel: str, **kw) -> Path:
    path = folder / "vs2005.vmc"
    path.write_bytes(b"\xff\xfe" + vmc_text(disk_rel, **kw).encode("utf-16-le"))
    return path


def vhd_chain(tiny_image, folder: Path) -> tuple[Path, Path]:
    """base.vhd (qemu-img, dynamic) + child.vhd (differencing, from the spec)."""
    folder.mkdir(exist_ok=True)
    base = folder / "base.vhd"
    qemu_img("convert", "-f", "qcow2", "-O", "vpc", str(tiny_disk(tiny_image)), str(base))
    info = read_vhd(base)
    child = folder / "child.vhd"
    write_vhd(child, size=info.current_size, geometry=info.geometry,
              disk_type="differencing", creator_app="vpc ",
              data={CHILD_SECTOR * 512: bytes([CHILD_BYTE]) * 512},
              parent=ParentRef(info.uuid, "base.vhd", [("W2ru", ".\\base.vhd"),
                                                       ("W2ku", "C:\\VMs\\base.vhd")]))
    return base, child


def ovf_text(href: str, capacity: int, size: int) -> str:
    return f'''<?xml version="1.0"?>
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="file1" ovf:href="{href}" ovf:size="{size}"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1"
      ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="tiny"><Info>a VM</Info><Name>tiny guest</Name>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>256</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection></VirtualSystem>
</Envelope>'''


def ovf_package(tiny_image, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    vmdk = folder / "disk1.vmdk"
    source = tiny_disk(tiny_image)
    qemu_img("convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized",
             str(source), str(vmdk))
    capacity = json.loads(qemu_img("info", "--output=json", "-f", "qcow2",
                                   str(source)))["virtual-size"]
    descriptor = folder / "tiny.ovf"
    descriptor.write_text(ovf_text("disk1.vmdk", capacity, vmdk.stat().st_size))
    return descriptor


def pack_ova(out: Path, members: list[tuple[str, bytes]], *, manifest: bool = True) -> Path:
    if manifest:
        lines = "".join(f"SHA256({n})= {hashlib.sha256(b).hexdigest()}\n" for n, b in members)
        members = members + [("tiny.mf", lines.encode())]
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def boots(host, name: str) -> None:
    host.cli("vm", "start", name)
    host.wait_agent(name, timeout=120)
    assert host.cli("vm", "exec", name, "--", "echo", "imported").stdout.strip() == "imported"
    host.cli("vm", "turn-off", name)


def import_json(host, *args: str) -> dict:
    return host.json("import", *args)


# --- .vmc --------------------------------------------------------------------------------------
@pytest.mark.qemu
def test_vmc_with_differencing_vhd_chain_imports_and_boots(host, tiny_image, tmp_path):
    base, child = vhd_chain(tiny_image, tmp_path / "vs")
    vmc = write_vmc(tmp_path / "vs", "child.vhd")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (base, child)}
    host.cli("switch", "create", "imp0", "--type", "private")

    result = import_json(host, "vmc", str(vmc), "--name", "vs1", "--switch", "imp0")
    vm = result["vm"]
    assert vm["uuid"] == GUID.strip("{}").lower() and vm["memory_bytes"] == 256 << 20
    assert [(n["switch"], n["mac"], n["model"]) for n in vm["nics"]] == [
        ("imp0", "00:03:ff:b1:86:a1", "e1000")]                   # the MAC is kept
    disk = vm["disks"][0]
    assert (disk["bus"], disk["format"], disk["owned"]) == ("ide", "qcow2", True)
    own = Path(disk["path"])
    assert own.parent == host.state_dir / "storage" / "vms" / vm["uuid"]   # the VM's own
    assert result["disks"][0]["virtual_size"] == read_vhd(child).virtual_size
    assert {a["code"] for a in result["attention"]} >= {"nic-model"}
    check = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c",
                            f"read -P {CHILD_BYTE:#x} {CHILD_SECTOR * 512} 512", str(own)],
                           capture_output=True, text=True, check=True)
    assert "verification failed" not in check.stdout             # the child's data is in
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digests} == digests

    boots(host, "vs1")                                            # the base's GRUB booted
    host.cli("vm", "delete", "vs1")
    assert not own.exists()                                       # owned: deleted with it
    assert files_under(host.state_dir / "storage") == []


def test_real_sample_refused_until_a_stand_in_disk_lies_beside_it(host, tmp_path):
    vmc = tmp_path / "mosa.vmc"
    shutil.copy(SAMPLE, vmc)
    refused = host.cli("import", "vmc", str(vmc), check=False)
    assert refused.returncode == 1 and "bootimage.vhd" in refused.stderr
    assert "not found" in refused.stderr
    assert host.json("vm", "list") == []

    qemu_img("create", "-f", "vpc", str(tmp_path / "bootimage.vhd"), "16M")
    result = import_json(host, "vmc", str(vmc))
    vm = result["vm"]
    assert (vm["name"], vm["memory_bytes"], vm["nics"]) == ("mosa", 128 << 20, [])
    assert vm["uuid"] == "8cfa867f-f796-4056-95f8-7f14cd0c5f58"    # BIOS GUID kept
    assert [(d["id"], d["media"], d["path"] is None) for d in vm["disks"]] == [
        ("disk0", "disk", False), ("cd0", "cdrom", True)]
    assert "nic-disabled" in {a["code"] for a in result["attention"]}
    human = host.cli("import", "vmc", str(vmc), "--name", "mosa2", check=False)
    assert human.returncode == 1 and "already has UUID" in human.stderr


# --- OVF / OVA and P2V -------------------------------------------------------------------------
@pytest.mark.qemu
def test_ovf_ova_and_p2v_import_and_boot(host, tiny_image, tmp_path):
    descriptor = ovf_package(tiny_image, tmp_path / "ovf")
    result = import_json(host, "ovf", str(descriptor))
    vm = result["vm"]
    assert (vm["name"], vm["vcpus"], vm["memory_bytes"]) == ("tiny-guest", 1, 256 << 20)
    assert vm["disks"][0]["bus"] == "ahci" and vm["disks"][0]["owned"]
    boots(host, "tiny-guest")

    ova = pack_ova(tmp_path / "tiny.ova", [(n, (descriptor.parent / n).read_bytes())
                                           for n in ("tiny.ovf", "disk1.vmdk")])
    import_json(host, "ovf", str(ova), "--name", "from-ova")
    boots(host, "from-ova")

    raw = tmp_path / "physical.img"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(tiny_disk(tiny_image)), str(raw))
    result = import_json(host, "disk", str(raw), "--name", "p2v", "--memory", "256M")
    assert "format-detected" in {a["code"] for a in result["attention"]}
    assert result["vm"]["disks"][0]["bus"] == "ide"
    boots(host, "p2v")
    staging = host.state_dir / "storage" / ".parvisor-import"
    assert not staging.exists() or list(staging.iterdir()) == []  # scratch space is gone


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_and_leaves_nothing(host, tmp_path):
    root = host.state_dir / "storage"
    traversal = pack_ova(tmp_path / "evil.ova", [("tiny.ovf", ovf_text("x.vmdk", 512, 4).encode()),
                                                 ("../x.vmdk", b"data")], manifest=False)
    done = host.cli("import", "ovf", str(traversal), check=False)
    assert done.returncode == 1 and "path traversal" in done.stderr

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    write_vhd(orphan / "child.vhd", size=8 << 20, disk_type="differencing",
              parent=ParentRef("6f1c3a52-8d1e-4c49-9a7e-2b1f0c9d8e77", "gone.vhd",
                               [("W2ru", ".\\gone.vhd")]))
    done = host.cli("import", "vmc", str(write_vmc(orphan, "child.vhd")), check=False)
    assert done.returncode == 1 and "parent disk not found" in done.stderr
    assert "gone.vhd" in done.stderr

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    qemu_img("create", "-f", "vpc", str(corrupt / "disk.vhd"), "8M")
    with open(corrupt / "disk.vhd", "r+b") as fh:            # a bit flip in the footer
        fh.seek(-512 + 40, 2)
        fh.write(b"\x7f")
    done = host.cli("import", "vmc", str(write_vmc(corrupt, "disk.vhd")), check=False)
    assert done.returncode == 1 and "footer checksum" in done.stderr
    assert "disk.vhd" in done.stderr

    package = tmp_path / "pkg"
    package.mkdir()
    qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized",
             str(package / "disk1.vmdk"), "1M")
    vmdk = (package / "disk1.vmdk").read_bytes()
    bad_digest = pack_ova(tmp_path / "bad.ova", [("tiny.ovf", ovf_text(
        "disk1.vmdk", 1 << 20, len(vmdk)).encode()), ("disk1.vmdk", vmdk)])
    _corrupt_manifest(bad_digest)
    done = host.cli("import", "ovf", str(bad_digest), check=False)   # fails inside the job
    assert done.returncode == 1 and "manifest digest" in done.stderr

    assert host.json("vm", "list") == []
    assert files_under(root) == []                       # no stray disk or temp file


def _corrupt_manifest(ova: Path) -> None:
    """Rewrite the .mf member with a wrong digest for disk1.vmdk."""
    with tarfile.open(ova) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = [(n, b"SHA256(disk1.vmdk)= " + b"0" * 64 + b"\n" if n.endswith(".mf") else b)
               for n, b in members]
    pack_ova(ova, members, manifest=False)


# --- crash during conversion ------------------------------------------------------------------
def test_sigkill_during_convert_leaves_only_staging_which_restart_removes(stopped_host,
                                                                          tmp_path):
    host = stopped_host
    raw = tmp_path / "big.img"
    with open(raw, "wb") as fh:                  # data to convert (qemu-img skips zeros)
        for _ in range(32):
            fh.write(hashlib.sha512(fh.tell().to_bytes(8, "big")).digest() * 16384)
    host.start(crash_at="import.converting")
    done = host.cli("import", "disk", str(raw), "--name", "crashy", "--format", "raw",
                    check=False)
    assert done.returncode == 1
    assert host.wait_service_exit() == -9
    staging = host.state_dir / "storage" / ".parvisor-import"
    assert [p.name for p in files_under(staging)] != []         # what the crash left
    vm_dirs = host.state_dir / "storage" / "vms"
    assert not vm_dirs.exists() or list(vm_dirs.iterdir()) == []   # no disk was placed

    host.start()
    assert files_under(host.state_dir / "storage") == []        # cleaned at start
    assert host.json("vm", "list") == []
    host.json("import", "disk", str(raw), "--name", "crashy", "--format", "raw")
    assert [vm["name"] for vm in host.json("vm", "list")] == ["crashy"]


# --- plan (local, no service) ----------------------------------------------------------------
INVENTORY = """name,cores,ghz,cpu_avg_pct,cpu_peak_pct,ram_gb,ram_used_gb,disk_gb
web1,2,2.0,10,50,50,20,100
web2,2,2.0,10,50,50,20,100
db1,4,2.0,20,60,50,40,200
app1,2,2.0,5,40,50,10,100
"""
MODEL = "std:cores=16,ghz=2.0,ram_gb=128,disk_gb=2000"


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PARVISOR, "plan", *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin",
                                           "PARVISOR_STATE_DIR": "/nonexistent"})


def test_plan_cli_table_json_html_and_cluster(tmp_path):
    csv = tmp_path / "servers.csv"
    csv.write_text(INVENTORY)
    common = ("--inventory", str(csv), "--host-model", MODEL)
    # RAM decides: 102.4 GB usable per host (20 % headroom) holds two 50 GB servers.
    table = plan_cli(*common)
    assert table.returncode == 0, table.stderr
    assert "3 x std (2 active + 1 reserve" in table.stdout
    data = json.loads(plan_cli(*common, "--format", "json", "--reserve", "2").stdout)
    assert (data["hosts_needed"], data["reserve"], data["lower_bound"]) == (4, 2, 2)
    assert sorted(data["placements"]) == ["app1", "db1", "web1", "web2"]
    html = tmp_path / "plan.html"
    done = plan_cli(*common, "--format", "html", "--output", str(html))
    assert done.returncode == 0 and "<svg" in html.read_text()
    cluster = plan_cli(*common, "--cluster")
    assert cluster.returncode == 1 and "not available yet" in cluster.stderr
    bad = plan_cli("--inventory", str(tmp_path / "missing.csv"), "--host-model", MODEL)
    assert bad.returncode == 1 and "missing.csv" in bad.stderr
