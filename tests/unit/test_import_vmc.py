""".vmc parsing and the pure import plan: the real Virtual PC 2007 sample plus generated
files covering IDE/SCSI, relative/absolute/bare paths, CDs, NICs and hostile input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput
from parvisor.importers.vmc import (
    MAX_VMC_BYTES, DriveKind, parse_vmc, parse_vmc_bytes, plan_vmc_import)

SAMPLE = Path("/work/shared/samples/virtualpc2007-mosa.vmc")


def location(loc_id: int, drive_type: int, absolute: str = "", relative: str = "",
             undo: str = "") -> str:
    return (f'<location id="{loc_id}"><drive_type type="integer">{drive_type}</drive_type>'
            f'<pathname><absolute type="string">{absolute}</absolute>'
            f'<relative type="string">{relative}</relative></pathname>'
            f'<undo_pathname><absolute type="string">{undo}</absolute>'
            f'<relative type="string">{undo}</relative></undo_pathname></location>')


def nic(index: int, mac: str, network: str) -> str:
    return (f'<ethernet_controller id="{index}"><virtual_network><name type="string">'
            f'{network}</name></virtual_network><ethernet_card_address type="bytes">{mac}'
            '</ethernet_card_address></ethernet_controller>')


def vmc_xml(*, ide: str = "", scsi: str = "", nics: str = "", nic_count: int = 0,
            extra: str = "", memory: int = 256) -> str:
    return ('<?xml version="1.0" encoding="UTF-16"?>\r\n<preferences>'
            '<version type="string">2.0</version><hardware>'
            f'<memory><ram_size type="integer">{memory}</ram_size></memory><pci_bus>'
            f'<ethernet_adapter><controller_count type="integer">{nic_count}'
            f'</controller_count>{nics}</ethernet_adapter>'
            f'<ide_adapter><ide_controller id="0">{ide}</ide_controller></ide_adapter>'
            f'{scsi}</pci_bus><bios><bios_guid type="string">'
            '{8CFA867F-F796-4056-95F8-7F14CD0C5F58}</bios_guid></bios></hardware>'
            f'{extra}</preferences>')


def write_vmc(folder: Path, xml: str, name: str = "vm.vmc") -> Path:
    path = folder / name
    path.write_bytes(b"\xff\xfe" + xml.encode("utf-16-le"))
    return path


# --- the real sample ------------------------------------------------------------------------
def test_real_sample_parses():
    config = parse_vmc(SAMPLE)
    assert config.memory_mib == 128 and config.creator == "Microsoft Virtual PC 2007"
    disk = config.drives[0]
    assert (disk.where, disk.kind, disk.path.relative) == ("IDE 0:0", DriveKind.HARD_DISK,
                                                           "bootimage.vhd")
    assert config.nics[0].mac == "00:03:ff:b1:86:a0" and not config.nics[0].enabled
    assert config.smbios_uuid == "8cfa867f-f796-4056-95f8-7f14cd0c5f58"
    assert not config.has_saved_state and not config.additions_installed


def test_real_sample_is_refused_naming_its_missing_disk(tmp_path):
    vmc = tmp_path / SAMPLE.name
    shutil.copy(SAMPLE, vmc)
    with pytest.raises(InvalidInput, match=r"disk bootimage\.vhd \(IDE 0:0\) not found"):
        plan_vmc_import(parse_vmc(vmc), tmp_path)


def test_real_sample_is_planned_once_a_disk_lies_beside_it(tmp_path):
    vmc = tmp_path / SAMPLE.name
    shutil.copy(SAMPLE, vmc)
    (tmp_path / "bootimage.vhd").write_bytes(b"stand-in")
    plan = plan_vmc_import(parse_vmc(vmc), tmp_path)
    assert plan.name == "virtualpc2007-mosa" and plan.memory_bytes == 128 << 20
    assert [(d.source, d.bus) for d in plan.disks] == [(tmp_path / "bootimage.vhd", "ide")]
    assert plan.nics == ()                             # controller_count is 0
    assert plan.cds[0].image is None                   # empty CD drive kept
    definition = plan.to_vm_definition({"disk0": tmp_path / "bootimage.qcow2"})
    assert definition.uuid == "8cfa867f-f796-4056-95f8-7f14cd0c5f58"
    assert [d.bus for d in definition.disks] == ["ide", "ide"]


def test_skip_missing_imports_without_the_disk_and_says_so(tmp_path):
    vmc = tmp_path / SAMPLE.name
    shutil.copy(SAMPLE, vmc)
    plan = plan_vmc_import(parse_vmc(vmc), tmp_path, skip_missing=True)
    assert plan.disks == ()
    assert any(a.code == "skipped-disk" and "bootimage.vhd" in a.message
               for a in plan.attention)


# --- path resolution ------------------------------------------------------------------------
@pytest.mark.parametrize("absolute,relative,expected,how", [
    ("C:\\VMs\\x\\d.vhd", ".\\sub\\d.vhd", "sub/d.vhd", "relative"),
    ("C:\\VMs\\x\\d.vhd", "..\\d.vhd", "../d.vhd", "relative"),
    ("C:\\Elsewhere\\d.vhd", "", "d.vhd", "bare-name"),
    ("C:\\Elsewhere\\d.vhd", ".\\gone\\d.vhd", "d.vhd", "bare-name"),
])
def test_disk_paths_relative_absolute_bare(tmp_path, absolute, relative, expected, how):
    folder = tmp_path / "vm"
    (folder / "sub").mkdir(parents=True)
    target = (folder / expected)
    target.write_bytes(b"x")
    vmc = write_vmc(folder, vmc_xml(ide=location(0, 1, absolute, relative)))
    disk = plan_vmc_import(parse_vmc(vmc), folder).disks[0]
    assert (disk.source.resolve(), disk.found_by) == (target.resolve(), how)


def test_posix_absolute_path_is_used(tmp_path):
    (tmp_path / "store").mkdir()
    disk = tmp_path / "store" / "d.vhd"
    disk.write_bytes(b"x")
    vmc = write_vmc(tmp_path, vmc_xml(ide=location(0, 1, str(disk), "")))
    assert plan_vmc_import(parse_vmc(vmc), tmp_path).disks[0].found_by == "absolute"


def test_injected_exists_keeps_the_planner_pure(tmp_path):
    vmc = write_vmc(tmp_path, vmc_xml(ide=location(0, 1, "C:\\a.vhd", "a.vhd")))
    seen = []
    plan = plan_vmc_import(parse_vmc(vmc), Path("/nowhere"),
                           exists=lambda p: seen.append(p) or p.name == "a.vhd")
    assert plan.disks[0].source == Path("/nowhere/a.vhd") and seen


# --- devices ------------------------------------------------------------------------------
def test_cd_image_and_host_drive(tmp_path):
    (tmp_path / "setup.iso").write_bytes(b"iso")
    ide = location(0, 1, "", "d.vhd") + location(1, 2, "C:\\isos\\setup.iso", "")
    (tmp_path / "d.vhd").write_bytes(b"x")
    vmc = write_vmc(tmp_path, vmc_xml(ide=ide))
    plan = plan_vmc_import(parse_vmc(vmc), tmp_path)
    assert plan.cds[0].image == tmp_path / "setup.iso"
    host = write_vmc(tmp_path, vmc_xml(ide=location(1, 2, "D:", "")), "host.vmc")
    plan = plan_vmc_import(parse_vmc(host), tmp_path)
    assert plan.cds[0].image is None and plan.attention[0].code == "host-drive"


def test_scsi_boot_disk_moves_to_ide_with_a_note(tmp_path):
    (tmp_path / "s.vhd").write_bytes(b"x")
    scsi = ('<scsi_adapter><scsi_controller id="0">' + location(0, 1, "", "s.vhd") +
            '</scsi_controller></scsi_adapter>')
    plan = plan_vmc_import(parse_vmc(write_vmc(tmp_path, vmc_xml(scsi=scsi))), tmp_path)
    assert [(d.original, d.bus) for d in plan.disks] == [("SCSI 0:0", "ide")]
    assert plan.attention[0].code == "scsi-boot-to-ide"


def test_nics_enabled_disabled_mac_and_switch(tmp_path):
    nics = nic(0, "0003FFB186A0", "Local only") + nic(1, "0003FF000001", "LAN") + \
        nic(2, "0003FF000002", "LAN")
    vmc = write_vmc(tmp_path, vmc_xml(nics=nics, nic_count=2))
    plan = plan_vmc_import(parse_vmc(vmc), tmp_path, switch_map={"LAN": "br-lan"})
    assert [(n.mac, n.switch) for n in plan.nics] == [
        ("00:03:ff:b1:86:a0", "Local-only"), ("00:03:ff:00:00:01", "br-lan")]
    codes = [a.code for a in plan.attention]
    assert "nic-disabled" in codes and "switch-by-name" in codes
    everything = plan_vmc_import(parse_vmc(vmc), tmp_path, switch_map={"*": "sw0"})
    assert {n.switch for n in everything.nics} == {"sw0"}


def test_bad_mac_is_refused(tmp_path):
    vmc = write_vmc(tmp_path, vmc_xml(nics=nic(0, "0003FF", "x"), nic_count=1))
    with pytest.raises(InvalidInput, match="ethernet_card_address"):
        parse_vmc(vmc)


def test_additions_undo_and_saved_state(tmp_path):
    (tmp_path / "d.vhd").write_bytes(b"x")
    extra = ('<integration><microsoft><version><additions_number type="string">13.820'
             '</additions_number></version></microsoft></integration>'
             '<settings><configuration><saved_state><path><absolute type="string">'
             'C:\\vm.vsv</absolute><relative type="string">.\\vm.vsv</relative></path>'
             '</saved_state></configuration></settings>')
    vmc = write_vmc(tmp_path, vmc_xml(ide=location(0, 1, "", "d.vhd", undo="d.vud"),
                                      extra=extra))
    parsed = parse_vmc(vmc)
    with pytest.raises(InvalidInput, match="saved state"):
        plan_vmc_import(parsed, tmp_path)
    with pytest.raises(InvalidInput, match="--undo commit"):
        plan_vmc_import(parsed, tmp_path, saved_state="discard")
    with pytest.raises(InvalidInput, match=r"undo disk d\.vud"):
        plan_vmc_import(parsed, tmp_path, saved_state="discard", undo="commit")
    (tmp_path / "d.vud").write_bytes(b"x")
    plan = plan_vmc_import(parsed, tmp_path, saved_state="discard", undo="commit")
    assert plan.disks[0].source == tmp_path / "d.vud"
    plan = plan_vmc_import(parsed, tmp_path, saved_state="discard", undo="discard")
    assert plan.disks[0].source == tmp_path / "d.vhd"
    assert "remove-additions" in [a.code for a in plan.attention]


# --- hostile input ------------------------------------------------------------------------
def test_utf8_is_accepted(tmp_path):
    path = tmp_path / "u.vmc"
    path.write_text(vmc_xml().replace("UTF-16", "UTF-8"), encoding="utf-8")
    assert parse_vmc(path).memory_mib == 256


def test_wrong_encoding_is_refused(tmp_path):
    path = tmp_path / "l.vmc"
    path.write_bytes(vmc_xml().replace("{8C", "\u00e9{8C").encode("latin-1"))
    with pytest.raises(InvalidInput, match="not UTF-16 or UTF-8"):
        parse_vmc(path)


@pytest.mark.parametrize("cut", [50, 200, -30])
def test_truncated_xml_is_refused(tmp_path, cut):
    xml = vmc_xml()
    path = write_vmc(tmp_path, xml[:cut])
    with pytest.raises(InvalidInput, match="malformed or truncated XML"):
        parse_vmc(path)


def test_entity_expansion_bomb_is_refused():
    bomb = ('<?xml version="1.0"?><!DOCTYPE preferences [<!ENTITY a "aaaaaaaaaa">'
            '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
            '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><preferences>&c;</preferences>')
    with pytest.raises(InvalidInput, match="forbidden XML construct"):
        parse_vmc_bytes(bomb.encode())


def test_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.vmc"
    path.write_bytes(b"\xff\xfe" + b" \0" * (MAX_VMC_BYTES // 2 + 10))
    with pytest.raises(InvalidInput, match="byte limit"):
        parse_vmc(path)


def test_deep_nesting_is_refused():
    xml = "<preferences>" + "<a>" * 100 + "</a>" * 100 + "</preferences>"
    with pytest.raises(InvalidInput, match="deeper than"):
        parse_vmc_bytes(xml.encode())


def test_wrong_root_and_missing_memory():
    with pytest.raises(InvalidInput, match="not <preferences>"):
        parse_vmc_bytes(b"<vm/>")
    with pytest.raises(InvalidInput, match="ram_size"):
        parse_vmc_bytes(b"<preferences><hardware/></preferences>")
