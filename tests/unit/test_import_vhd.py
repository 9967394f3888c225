"""VHD validation and differencing chains, cross-checked with qemu-img.

Fixed and dynamic files come from ``qemu-img create -f vpc``; differencing files come from
``parvisor.testing.vhd_writer`` and are read back by qemu-img too (QEMU opens a
differencing VHD as a stand-alone dynamic disk), so the fixtures are not checked only by
our own reader.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput
from parvisor.importers.vhd import (
    DiskType, Geometry, apply_copy_plan, check_vhdx, chs_geometry, qemu_image_opts,
    read_vhd, resolve_chain)
from parvisor.testing.vhd_writer import ParentRef, write_vhd

MiB = 1 << 20
SIZE = chs_geometry(8 * MiB).size          # an exact CHS size: 240/4/17


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def qemu_virtual_size(path: Path) -> int:
    return json.loads(qemu_img("info", "--output=json", "-f", "vpc", str(path)).stdout)[
        "virtual-size"]


def make_chain(tmp_path: Path, *, locators=None) -> tuple[Path, Path]:
    base = tmp_path / "base.vhd"
    base_uuid = write_vhd(base, size=SIZE, block_size=MiB,
                          data={0: b"P" * 512, 4 * MiB: b"Q" * 1024})
    child = tmp_path / "child.vhd"
    locators = locators if locators is not None else [
        ("W2ru", ".\\base.vhd"), ("W2ku", "C:\\VMs\\base.vhd")]
    write_vhd(child, size=SIZE, disk_type="differencing", block_size=MiB,
              data={512: b"C" * 512, 4 * MiB: b"D" * 512},
              parent=ParentRef(base_uuid, "C:\\VMs\\base.vhd", locators))
    return base, child


# --- made by qemu-img ---------------------------------------------------------------------
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_qemu_img_vhds_validate_with_the_same_virtual_size(tmp_path, subformat):
    path = tmp_path / f"{subformat}.vhd"
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat}", str(path), "10M")
    info = read_vhd(path)
    assert info.disk_type is (DiskType.FIXED if subformat == "fixed" else DiskType.DYNAMIC)
    assert info.creator_app == "qemu" and info.size_rule == "chs"
    assert info.virtual_size == qemu_virtual_size(path) == info.geometry.size


def test_force_size_vhd_uses_current_size_like_qemu(tmp_path):
    path = tmp_path / "exact.vhd"
    qemu_img("create", "-f", "vpc", "-o", "force_size=on", str(path), "10M")
    info = read_vhd(path)
    assert (info.creator_app, info.size_rule) == ("qem2", "current_size")
    assert info.virtual_size == 10 * MiB == qemu_virtual_size(path)


def test_virtual_pc_disk_is_sized_by_chs_not_current_size(tmp_path):
    # Virtual PC records a current size larger than C*H*S*512; the guest saw the CHS size.
    path = tmp_path / "vpc.vhd"
    write_vhd(path, size=SIZE + 5 * 512, geometry=chs_geometry(SIZE), creator_app="vpc ")
    info = read_vhd(path)
    assert info.virtual_size == SIZE < info.current_size
    size = json.loads(qemu_img("info", "--output=json", "--image-opts",
                               qemu_image_opts(info)).stdout)["virtual-size"]
    assert size == SIZE


# --- differencing chains -----------------------------------------------------------------
def test_differencing_child_is_read_by_qemu_img_and_by_us(tmp_path):
    base, child = make_chain(tmp_path)
    info = read_vhd(child)
    assert info.is_differencing and info.parent_uuid == read_vhd(base).uuid
    assert {loc.platform for loc in info.parent_locators} == {"W2ru", "W2ku"}
    # qemu-img reads the child alone (no parent): its own sectors must be where we wrote them
    raw = tmp_path / "child-alone.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(child), str(raw))
    data = raw.read_bytes()
    assert data[512:1024] == b"C" * 512 and data[4 * MiB:4 * MiB + 512] == b"D" * 512
    assert qemu_virtual_size(child) == info.virtual_size


def test_chain_flattens_parent_and_child_data(tmp_path):
    base, child = make_chain(tmp_path)
    chain = resolve_chain(child, [tmp_path])
    assert [lvl.path for lvl in chain.levels] == [base, child]
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "--image-opts", qemu_image_opts(chain.base), "-O", "raw", str(raw))
    apply_copy_plan(chain.copy_plan(), raw)
    qcow = tmp_path / "flat.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(qcow), str(back))
    data = back.read_bytes()
    assert len(data) == chain.virtual_size == SIZE
    assert data[:512] == b"P" * 512                   # from the parent
    assert data[512:1024] == b"C" * 512               # from the child
    assert data[4 * MiB:4 * MiB + 512] == b"D" * 512  # child overrides parent ...
    assert data[4 * MiB + 512:4 * MiB + 1024] == b"Q" * 512  # ... sector by sector


def test_absolute_locator_is_used_when_relative_is_missing(tmp_path):
    (tmp_path / "store").mkdir()
    base = tmp_path / "store" / "base-disk.vhd"
    uid = write_vhd(base, size=SIZE, block_size=MiB)
    child = tmp_path / "child.vhd"
    write_vhd(child, size=SIZE, disk_type="differencing", block_size=MiB,
              parent=ParentRef(uid, "base-disk.vhd", [("W2ku", str(base))]))
    assert resolve_chain(child, [tmp_path]).base.path == base


def test_missing_parent_is_refused_naming_it(tmp_path):
    base, child = make_chain(tmp_path)
    base.unlink()
    with pytest.raises(InvalidInput, match=r"parent disk not found .*base\.vhd"):
        resolve_chain(child, [tmp_path])


def test_parent_outside_roots_is_refused(tmp_path):
    outside, inside = tmp_path / "outside", tmp_path / "inside"
    outside.mkdir(), inside.mkdir()
    uid = write_vhd(outside / "base.vhd", size=SIZE, block_size=MiB)
    write_vhd(inside / "child.vhd", size=SIZE, disk_type="differencing", block_size=MiB,
              parent=ParentRef(uid, "base.vhd", [("W2ru", "..\\outside\\base.vhd")]))
    with pytest.raises(InvalidInput, match="outside the storage roots"):
        resolve_chain(inside / "child.vhd", [inside])


def test_loop_is_refused(tmp_path):
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    ua, ub = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    write_vhd(a, size=SIZE, disk_type="differencing", block_size=MiB, uid=ua,
              parent=ParentRef(ub, "b.vhd", [("W2ru", ".\\b.vhd")]))
    write_vhd(b, size=SIZE, disk_type="differencing", block_size=MiB, uid=ub,
              parent=ParentRef(ua, "a.vhd", [("W2ru", ".\\a.vhd")]))
    with pytest.raises(InvalidInput, match="loops"):
        resolve_chain(a, [tmp_path])


def test_too_deep_chain_is_refused(tmp_path):
    uid = write_vhd(tmp_path / "l0.vhd", size=SIZE, block_size=MiB)
    for level in range(1, 5):
        uid = write_vhd(tmp_path / f"l{level}.vhd", size=SIZE, disk_type="differencing",
                        block_size=MiB, parent=ParentRef(uid, f"l{level - 1}.vhd",
                                                         [("W2ru", f"l{level - 1}.vhd")]))
    assert len(resolve_chain(tmp_path / "l4.vhd", [tmp_path]).levels) == 5
    with pytest.raises(InvalidInput, match="deeper than 2"):
        resolve_chain(tmp_path / "l4.vhd", [tmp_path], max_depth=2)


def test_parent_uuid_mismatch_is_refused(tmp_path):
    base, child = make_chain(tmp_path)
    write_vhd(base, size=SIZE, block_size=MiB)        # replaced: a new UUID
    with pytest.raises(InvalidInput, match="does not match"):
        resolve_chain(child, [tmp_path])


# --- broken files ------------------------------------------------------------------------
def test_corrupt_footer_checksum(tmp_path):
    path = tmp_path / "d.vhd"
    write_vhd(path, size=SIZE, block_size=MiB)
    blob = bytearray(path.read_bytes())
    blob[-512 + 40] ^= 0xFF                           # current size byte, end footer
    path.write_bytes(bytes(blob))
    with pytest.raises(InvalidInput, match=r"d\.vhd: footer checksum"):
        read_vhd(path)


def test_corrupt_dynamic_header_checksum(tmp_path):
    path = tmp_path / "d.vhd"
    write_vhd(path, size=SIZE, block_size=MiB)
    blob = bytearray(path.read_bytes())
    blob[512 + 40] ^= 0x01                            # inside the parent UUID
    path.write_bytes(bytes(blob))
    with pytest.raises(InvalidInput, match="dynamic header checksum"):
        read_vhd(path)


def test_truncated_dynamic_file(tmp_path):
    path = tmp_path / "d.vhd"
    write_vhd(path, size=SIZE, block_size=MiB, data={0: b"x" * 512})
    path.write_bytes(path.read_bytes()[:-(MiB // 2)])
    with pytest.raises(InvalidInput, match="footer"):
        read_vhd(path)


def test_truncated_fixed_file(tmp_path):
    path = tmp_path / "f.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", str(path), "4M")
    blob = path.read_bytes()
    path.write_bytes(blob[:MiB] + blob[-512:])        # data cut, footer kept
    with pytest.raises(InvalidInput, match=r"current size: .*truncated"):
        read_vhd(path)


def test_not_a_vhd(tmp_path):
    path = tmp_path / "x.vhd"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidInput, match="not a VHD"):
        read_vhd(path)


def test_table_too_small_for_the_virtual_size(tmp_path):
    path = tmp_path / "d.vhd"
    write_vhd(path, size=SIZE, block_size=MiB)
    blob = bytearray(path.read_bytes())
    header = bytearray(blob[512:1536])
    struct.pack_into(">I", header, 28, 2)             # max table entries: 2 x 1 MiB < 8 MiB
    struct.pack_into(">I", header, 36, 0)
    from parvisor.importers.vhd import vhd_checksum
    struct.pack_into(">I", header, 36, vhd_checksum(bytes(header), 36))
    blob[512:1536] = header
    path.write_bytes(bytes(blob))
    with pytest.raises(InvalidInput, match="max table entries.*impossible sizes"):
        read_vhd(path)


def test_geometry_larger_than_current_size_is_impossible(tmp_path):
    path = tmp_path / "d.vhd"
    write_vhd(path, size=SIZE // 2, geometry=chs_geometry(SIZE), block_size=MiB)
    with pytest.raises(InvalidInput, match="geometry: CHS size"):
        read_vhd(path)


def test_bat_entry_outside_the_file(tmp_path):
    path = tmp_path / "d.vhd"
    write_vhd(path, size=SIZE, block_size=MiB, data={0: b"x" * 512})
    blob = bytearray(path.read_bytes())
    struct.pack_into(">I", blob, 1536, 0x00FFFFFF)    # BAT entry 0 far beyond the end
    path.write_bytes(bytes(blob))
    with pytest.raises(InvalidInput, match="BAT entry 0"):
        read_vhd(path)


def test_chs_geometry_follows_the_spec():
    assert chs_geometry(8 * MiB) == Geometry(240, 4, 17)
    assert chs_geometry(127 * 1024 * MiB).heads == 16
    assert chs_geometry(1 << 40) == Geometry(65535, 16, 255)   # capped


def test_vhdx_signature(tmp_path):
    good = tmp_path / "d.vhdx"
    qemu_img("create", "-f", "vhdx", str(good), "8M")
    check_vhdx(good)
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfilX" + b"\0" * (2 * MiB))
    with pytest.raises(InvalidInput, match="'vhdxfile'"):
        check_vhdx(bad)
