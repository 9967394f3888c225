"""Disk files with real qemu-img: creation, chains, resize, convert, delete, and every
bad-input case (outside the roots, escaping symlinks, hostile backing files, loops,
truncated/corrupt images, shrinking, deleting a parent). Each refusal changes nothing."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from parvisor.cli.disk_commands import parse_device_option, split_option
from parvisor.config import load_config
from parvisor.errors import AlreadyExists, InvalidInput
from parvisor.ops.requests import CreateVm
from parvisor.service import HostService
from parvisor.storage import disks
from parvisor.storage.chains import children_of, walk_chain

M = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_create_info_and_no_temporary_left(root):
    info = disks.create_disk(root / "a.qcow2", [root], size=8 * M)
    assert (info["format"], info["virtual_size"], info["chain"]) == ("qcow2", 8 * M, [])
    raw = disks.create_disk(root / "sub" / "b.raw", [root], size=M, fmt="raw")
    assert raw["format"] == "raw" and raw["actual_size"] is not None
    assert listing(root) == ["a.qcow2", "sub", "sub/b.raw"]


def test_create_refuses_outside_roots_symlinks_and_overwrite(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    for bad in (outside / "x.qcow2", root / "escape" / "x.qcow2", "relative.qcow2"):
        with pytest.raises(InvalidInput):
            disks.create_disk(bad, [root], size=M)
    disks.create_disk(root / "a.qcow2", [root], size=M)
    with pytest.raises(AlreadyExists):
        disks.create_disk(root / "a.qcow2", [root], size=2 * M)
    with pytest.raises(InvalidInput, match="multiple of 512"):
        disks.create_disk(root / "odd.qcow2", [root], size=1000)
    assert list(outside.iterdir()) == [] and listing(root) == ["a.qcow2", "escape"]


def test_differencing_child_and_its_chain(root):
    disks.create_disk(root / "base.qcow2", [root], size=4 * M)
    child = disks.create_disk(root / "child.qcow2", [root], size=None,
                              parent=root / "base.qcow2")
    assert child["virtual_size"] == 4 * M
    assert [c["path"] for c in child["chain"]] == [str(root / "base.qcow2")]
    assert children_of(root / "base.qcow2", [root]) == [root / "child.qcow2"]
    with pytest.raises(InvalidInput, match="smaller"):
        disks.create_disk(root / "small.qcow2", [root], size=M, parent=root / "base.qcow2")


def test_hostile_backing_files_are_refused(root, tmp_path):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"s" * 512)
    image = root / "evil.qcow2"
    disks.create_disk(image, [root], size=M)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(image))
    with pytest.raises(InvalidInput, match="outside the storage roots"):
        walk_chain(image, "qcow2", [root])
    (root / "link.raw").symlink_to(secret)              # escaping through a symlink
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(root / "link.raw"), "-F", "raw",
             str(image))
    with pytest.raises(InvalidInput, match="outside the storage roots"):
        walk_chain(image, "qcow2", [root])
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "evil.qcow2", "-F", "qcow2", str(image))
    with pytest.raises(InvalidInput, match="loops"):
        walk_chain(image, "qcow2", [root])
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "nbd:localhost:10809", "-F", "raw",
             str(image))
    with pytest.raises(InvalidInput, match="protocol"):
        walk_chain(image, "qcow2", [root])
    # the same chain checks guard differencing-disk creation and conversion
    with pytest.raises(InvalidInput):
        disks.create_disk(root / "c.qcow2", [root], size=None, parent=image)
    with pytest.raises(InvalidInput):
        disks.convert_disk(image, root / "out.qcow2", [root])
    assert "chain_error" in disks.disk_info(image, [root])
    assert not (root / "c.qcow2").exists() and not (root / "out.qcow2").exists()


def test_truncated_and_corrupt_images_are_refused(root):
    truncated = root / "trunc.qcow2"
    disks.create_disk(truncated, [root], size=64 * M)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", str(truncated)],
                   check=True, capture_output=True)
    with open(truncated, "r+b") as handle:
        handle.truncate(300 * 1024)
    with pytest.raises(InvalidInput):
        disks.validated_chain(truncated, "qcow2", [root])
    corrupt = root / "corrupt.qcow2"
    disks.create_disk(corrupt, [root], size=M)
    with open(corrupt, "r+b") as handle:        # L1 table offset -> far beyond the file
        handle.seek(40)
        handle.write((1 << 40).to_bytes(8, "big"))
    with pytest.raises(InvalidInput):
        disks.validated_chain(corrupt, "qcow2", [root])
    with pytest.raises(InvalidInput):
        disks.convert_disk(corrupt, root / "out.qcow2", [root])
    assert not (root / "out.qcow2").exists()
    assert not [p for p in root.iterdir() if ".partial-" in p.name]


def test_resize_grows_only(root):
    image = root / "g.qcow2"
    disks.create_disk(image, [root], size=2 * M)
    assert disks.resize_disk(image, [root], 4 * M)["virtual_size"] == 4 * M
    with pytest.raises(InvalidInput, match="shrink"):
        disks.resize_disk(image, [root], M)
    with pytest.raises(InvalidInput, match="already"):
        disks.resize_disk(image, [root], 4 * M)
    assert disks.disk_info(image, [root])["virtual_size"] == 4 * M


@pytest.mark.parametrize("fmt,options", [("vpc", []), ("vpc", ["-o", "subformat=fixed"]),
                                         ("vhdx", [])])
def test_vhd_and_vhdx_convert_to_qcow2(root, tmp_path, fmt, options):
    source = tmp_path / f"in.{fmt}"              # sources may live outside the roots
    qemu_img("create", "-f", fmt, *options, str(source), "16M")
    expected = disks.disk_info(source, [root], fmt)["virtual_size"]
    for given in (fmt, None):                    # explicit and detected source format
        target = root / f"out-{given}.qcow2"
        info = disks.convert_disk(source, target, [root], source_format=given)
        assert (info["format"], info["virtual_size"]) == ("qcow2", expected)
    with pytest.raises(AlreadyExists):
        disks.convert_disk(source, root / "out-None.qcow2", [root])


def test_vhd_is_not_attached_directly(root):
    qemu_img("create", "-f", "vpc", str(root / "w.vhd"), "8M")
    with pytest.raises(InvalidInput, match="convert it first"):
        disks.format_of(root / "w.vhd", [root])


def test_delete_refuses_parents_and_used_disks(root):
    disks.create_disk(root / "base.qcow2", [root], size=M)
    disks.create_disk(root / "child.qcow2", [root], size=None, parent=root / "base.qcow2")
    with pytest.raises(InvalidInput, match="parent of 1"):
        disks.delete_disk(root / "base.qcow2", [root], lambda p: [])
    with pytest.raises(InvalidInput, match="used by VM"):
        disks.delete_disk(root / "child.qcow2", [root], lambda p: ["web"])
    disks.delete_disk(root / "child.qcow2", [root], lambda p: [])
    disks.delete_disk(root / "base.qcow2", [root], lambda p: [])
    assert listing(root) == []


def test_device_option_syntax():
    assert split_option("/a,,b.qcow2,bus=ide") == ["/a,b.qcow2", "bus=ide"]
    assert parse_device_option("/x.img,bus=ahci,readonly", "path", ("bus",),
                               ("readonly",)) == {"path": "/x.img", "bus": "ahci",
                                                  "readonly": True}
    with pytest.raises(InvalidInput, match="unknown option"):
        parse_device_option("1G,speed=fast", "size", ("bus", "format"))


# --- through the VM manager: ownership, rollback, chain checks on attach ----------------
@pytest.fixture
def service(tmp_path):
    svc = HostService(load_config(tmp_path / "s"))
    root = svc.config.storage_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vmlinuz").write_bytes(b"kernel")
    yield svc
    svc.store.close()


def create(svc, name: str, **extra) -> dict:
    root = svc.config.storage_roots[0]
    return svc.vms.create(CreateVm(name=name, kernel=str(root / "vmlinuz"), **extra))


def test_vm_new_disks_are_owned_and_deleted_with_the_vm(service):
    root = service.config.storage_roots[0]
    disks.create_disk(root / "user.qcow2", [root], size=M)
    vm = create(service, "own", disks=[{"path": str(root / "user.qcow2")}],
                new_disks=[{"size": "2M"}, {"size": "1M", "bus": "virtio-scsi",
                                            "format": "raw"}])
    ids = [(d["id"], d["owned"], d["bus"]) for d in vm.disks]
    assert ids == [("disk0", False, "virtio-blk"), ("disk1", True, "virtio-blk"),
                   ("disk2", True, "virtio-scsi")]
    own = [Path(d["path"]) for d in vm.disks if d["owned"]]
    vm_dir = root / "vms" / vm.uuid                    # keyed by uuid: names get reused
    assert all(p.is_file() and p.parent == vm_dir for p in own)
    with pytest.raises(AlreadyExists):                 # store refuses: files rolled back
        create(service, "own", new_disks=[{"size": "1M"}, {"size": "1M"}, {"size": "1M"}])
    assert sorted(p.name for p in (root / "vms").iterdir()) == [vm.uuid]
    assert sorted(p.name for p in vm_dir.iterdir()) == ["disk1.qcow2", "disk2.raw"]
    asyncio.run(service.vms.delete("own"))
    assert not any(p.exists() for p in own) and (root / "user.qcow2").exists()


def test_vm_create_checks_the_whole_chain_of_given_disks(service, tmp_path):
    root = service.config.storage_roots[0]
    outside = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(outside), "1M")
    disks.create_disk(root / "c.qcow2", [root], size=M)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(outside), "-F", "qcow2",
             str(root / "c.qcow2"))
    with pytest.raises(InvalidInput, match="outside the storage roots"):
        create(service, "bad", disks=[{"path": str(root / "c.qcow2")}],
               new_disks=[{"size": "1M"}])
    with pytest.raises(InvalidInput, match="outside the storage roots"):
        create(service, "bad", disk=str(outside))
    assert service.vms.list() == [] and not (root / "vms").exists()


def test_qemu_img_runs_are_capped_and_keep_room_for_their_threads():
    """Hostile images: inspection is capped hard (address space and CPU time); real work
    keeps room for qemu-img's I/O thread pool (a 1 GiB cap made converts fail under load
    with "qemu_thread_create: Resource temporarily unavailable")."""
    from parvisor.storage import qemu_img as qi

    def limits(inspect: bool) -> str:
        done = qi.run_limited(["sh", "-c", "cat /proc/self/limits; echo $MALLOC_ARENA_MAX"],
                              inspect=inspect, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    inspecting = limits(True)
    assert f"Max address space         {qi.INSPECT_ADDRESS_SPACE}" in inspecting
    assert f"Max cpu time              {qi.INSPECT_CPU_SECONDS}" in inspecting
    working = limits(False)
    assert f"Max address space         {qi.WORK_ADDRESS_SPACE}" in working
    assert "Max cpu time              unlimited" in working
    assert working.strip().endswith("2")      # MALLOC_ARENA_MAX
