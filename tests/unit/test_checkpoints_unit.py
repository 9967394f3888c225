"""Checkpoint records, their store methods and the qemu-img snapshot adapter."""

from __future__ import annotations

import subprocess

import pytest

from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.model.checkpoint import Checkpoint, checkpoint_from_document
from parvisor.model.vm import VmDefinition
from parvisor.ops.checkpoints import snapshot_disks
from parvisor.storage import snapshots
from parvisor.store.sqlite import SqliteStore

KERNEL = {"kind": "kernel", "kernel": "/k"}


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "p.db")
    yield s
    s.close()


def _put(store, vm_uuid, name, parent=None, current=True):
    cp = Checkpoint(vm_uuid=vm_uuid, name=name, parent=parent, phase="ready")
    store.put_checkpoint(cp.to_document(), create=True, make_current=current)
    return cp


def test_model_names_versions_and_tags():
    cp = Checkpoint(vm_uuid="u", name="before-upgrade")
    assert cp.snapshot == f"pv-{cp.id}" and cp.phase == "creating"
    assert checkpoint_from_document(cp.to_document()) == cp
    with pytest.raises(ValueError):
        Checkpoint(vm_uuid="u", name="a/b")
    with pytest.raises(ValueError, match="newer"):
        checkpoint_from_document({**cp.to_document(), "format_version": 9})


def test_store_tree_delete_middle_reparents_and_moves_current(store):
    vm = store.create_vm(VmDefinition(name="a", boot=KERNEL)).uuid
    c1 = _put(store, vm, "c1")
    c2 = _put(store, vm, "c2", c1.id)
    c3 = _put(store, vm, "c3", c2.id)
    assert store.current_checkpoint(vm) == c3.id
    with pytest.raises(AlreadyExists):
        _put(store, vm, "c2")
    store.delete_checkpoint(vm, c2.id)
    docs = {d["name"]: d for d in store.list_checkpoints(vm)}
    assert list(docs) == ["c1", "c3"] and docs["c3"]["parent"] == c1.id
    store.delete_checkpoint(vm, c3.id)                     # the current one
    assert store.current_checkpoint(vm) == c1.id
    with pytest.raises(NotFound):
        store.put_checkpoint(c3.to_document(), create=False)
    store.delete_vm(vm)
    assert store.list_checkpoints(vm) == [] and store.current_checkpoint(vm) is None


def test_snapshot_disks_refuses_raw_and_diskless():
    raw = VmDefinition(name="r", boot=KERNEL, disks=[{"id": "d0", "path": "/x.raw",
                                                      "format": "raw"}])
    with pytest.raises(InvalidInput, match="raw"):
        snapshot_disks(raw)
    with pytest.raises(InvalidInput, match="no writable disk"):
        snapshot_disks(VmDefinition(name="n", boot=KERNEL))


def test_qemu_img_snapshots_keep_other_points(tmp_path):
    disk = tmp_path / "d,1.qcow2"                          # a comma must be escaped
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)

    def write(byte):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} 0 4k", str(disk)],
                       check=True, capture_output=True)

    def first_byte():
        out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -v 0 1", str(disk)],
                             check=True, capture_output=True, text=True).stdout
        return out.split()[1]
    for tag, byte in (("pv-1", "0x11"), ("pv-2", "0x22"), ("pv-3", "0x33")):
        write(byte)
        snapshots.create_snapshot(disk, tag)
    write("0x44")
    snapshots.delete_snapshot(disk, "pv-2")
    snapshots.delete_snapshot(disk, "pv-2", missing_ok=True)
    assert snapshots.list_snapshots(disk) == ["pv-1", "pv-3"]
    snapshots.apply_snapshot(disk, "pv-1")
    assert first_byte() == "11"
    snapshots.apply_snapshot(disk, "pv-3")
    assert first_byte() == "33"
