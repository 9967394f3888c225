"""Shared disks (guest clustering): the model's rules, the QEMU arguments at start and
at hot-add (the argv golden is in test_argv.py), and every refusal of what would corrupt a disk several VMs write.

The API cases run the real app and manager on a temporary state dir with real
qemu-img images (no QEMU: the VMs stay off, so disks change in definitions only)."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from parvisor.api.app import create_app
from parvisor.cluster.vm_ops import ClusterVmManager, OwnedElsewhere
from parvisor.config import load_config
from parvisor.migration.checks import shared_disk_refusals
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition, upgrade_definition
from parvisor.ops.hotplug_devices import _disk_device, blockdev_nodes
from parvisor.service import HostService
from parvisor.store.etcd import Keys
from parvisor.vm import argv as qargv
from parvisor.vm.argv import LaunchSpec
from parvisor.vm.paths import VmPaths

KERNEL = {"kind": "kernel", "kernel": "/k"}
UUID = "0b0e5a4e-5c1d-4d7e-9a55-3f2b8c6d7e02"
SHARED = {"id": "quorum", "path": "/cluster/shared/quorum.raw", "format": "raw",
          "bus": "virtio-scsi", "shared": True}


def vm_with(*disks: dict) -> VmDefinition:
    return VmDefinition.model_validate({"name": "node1", "uuid": UUID, "boot": KERNEL,
                                        "disks": list(disks)})


# --- the model ------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"format": "qcow2"}, "must be raw: qcow2 metadata"),
    ({"bus": "virtio-blk"}, "sits on the virtio-scsi bus"),
    ({"readonly": True}, "read-only disk needs no sharing"),
    ({"owned": True}, "belongs to no single VM"),
    ({"media": "cdrom"}, "only disks can be shared"),
])
def test_a_shared_disk_that_would_corrupt_or_mislead_is_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        vm_with({**SHARED, **change})


def test_shared_survives_the_store_round_trip_and_old_definitions_upgrade():
    vm = vm_with(SHARED)
    again = VmDefinition.model_validate_json(vm.model_dump_json())
    assert again == vm and again.disks[0].shared
    v5 = {"schema_version": 5, "name": "old", "boot": KERNEL,
          "disks": [{"id": "d0", "path": "/d0.qcow2"}]}
    upgraded = VmDefinition.model_validate(upgrade_definition(v5))
    assert upgraded.schema_version == 6 and not upgraded.disks[0].shared


# --- QEMU arguments ---------------------------------------------------------------------------
def spec(vm: VmDefinition, **extra) -> LaunchSpec:
    return LaunchSpec(definition=vm, paths=VmPaths(Path("/var/lib/parvisor"), vm.uuid),
                      accelerator="tcg", **extra)


def test_shared_disk_is_cache_none_even_where_other_disks_fall_back():
    vm = vm_with(SHARED)
    args = qargv.disks_args(spec(vm, buffered_disks=frozenset({"quorum"})))
    assert "cache.direct=on,aio=native" in args[1]
    device = args[-1]
    assert device.startswith("scsi-hd,bus=scsi0.0,") and ",share-rw=on," in device
    plain = qargv.disks_args(spec(vm_with({**SHARED, "shared": False, "id": "p"})))[-1]
    assert "share-rw" not in plain and "serial" not in plain


def test_every_vm_sees_the_same_serial_for_the_same_file():
    a = vm_with(SHARED).disks[0]
    b = vm_with({**SHARED, "id": "disk3"}).disks[0]
    other = vm_with({**SHARED, "path": "/cluster/shared/other.raw"}).disks[0]
    assert qargv.shared_disk_serial(a) == qargv.shared_disk_serial(b)
    assert qargv.shared_disk_serial(a) != qargv.shared_disk_serial(other)
    assert len(qargv.shared_disk_serial(a)) <= 36           # scsi-hd's limit


def test_hot_add_gives_qemu_what_a_start_would():
    disk = vm_with(SHARED).disks[0]
    argv_device = qargv.disk_device_args(disk, ide_port=None, bootindex=None)[1]
    argv_props = dict(item.split("=", 1) for item in argv_device.split(",")[1:])
    qmp = _disk_device(disk, None)
    assert qmp.pop("driver") == argv_device.split(",")[0] == "scsi-hd"
    assert qmp.pop("share-rw") is True and argv_props.pop("share-rw") == "on"
    assert {k: str(v) for k, v in qmp.items()} == argv_props
    file_node, fmt_node = blockdev_nodes(disk, direct_io=True)
    assert file_node["cache"] == {"direct": True} and fmt_node["driver"] == "raw"


# --- refusals through the API -------------------------------------------------------------------
@pytest.fixture
def service(tmp_path):
    svc = HostService(load_config(tmp_path / "s"))
    (svc.config.storage_roots[0] / "vmlinuz").write_bytes(b"not really a kernel")
    yield svc
    svc.store.close()


@pytest.fixture
def api(service):
    client = TestClient(create_app(service))
    kernel = str(service.config.storage_roots[0] / "vmlinuz")
    for name in ("n1", "n2", "n3"):
        assert client.post("/v1/vms", json={"name": name, "kernel": kernel}).status_code == 201
    return client


def root(service) -> Path:
    return service.config.storage_roots[0]


def disk_file(api, service, name: str, fmt: str = "raw") -> str:
    path = str(root(service) / name)
    response = api.post("/v1/disks", json={"path": path, "size": "8M", "format": fmt})
    assert response.status_code == 201, response.text
    user = service.vms._qemu_user()       # QEMU opens hot-added disks as this user
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def refused(response, *words: str) -> str:
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message
    return message


def definitions(service) -> dict[str, VmDefinition]:
    return {r.name: r.definition for r in service.store.list_vms()}


def test_two_vms_share_one_disk_and_nothing_else_may_write_it(api, service):
    path = disk_file(api, service, "quorum.raw")
    for name in ("n1", "n2"):
        added = api.post(f"/v1/vms/{name}/disks", json={"path": path, "shared": True})
        assert added.status_code == 201, added.text
        disk = added.json()["disk"]
        assert (disk["shared"], disk["bus"], disk["format"], disk["owned"]) == (
            True, "virtio-scsi", "raw", False)
    before = definitions(service)
    refused(api.post("/v1/vms/n3/disks", json={"path": path}), "already used", "--shared")
    refused(api.post("/v1/vms/n1/disks", json={"path": path, "shared": True}),
            "already has")
    plain = disk_file(api, service, "plain.raw")
    assert api.post("/v1/vms/n3/disks", json={"path": plain}).status_code == 201
    refused(api.post("/v1/vms/n1/disks", json={"path": plain, "shared": True}),
            "plain (not shared) disk of VM(s) n3")
    assert {k: v for k, v in definitions(service).items() if k != "n3"} == {
        k: v for k, v in before.items() if k != "n3"}
    # deleting a VM never deletes the shared disk
    assert api.request("DELETE", "/v1/vms/n1").status_code == 200
    assert Path(path).exists()


def test_bad_shared_requests_are_refused_and_change_nothing(api, service):
    qcow2 = disk_file(api, service, "q.qcow2", "qcow2")
    raw = disk_file(api, service, "r.raw")
    before = definitions(service)
    refused(api.post("/v1/vms/n1/disks", json={"path": qcow2, "shared": True}),
            "must be raw")
    refused(api.post("/v1/vms/n1/disks", json={"size": "8M", "shared": True}),
            "disk create", "--format raw")
    refused(api.post("/v1/vms/n1/disks", json={"path": raw, "shared": True,
                                                "bus": "virtio-blk"}), "virtio-scsi")
    refused(api.post("/v1/vms/n1/disks", json={"path": raw, "shared": True,
                                                "readonly": True}), "read-only")
    assert definitions(service) == before


def test_in_a_cluster_a_shared_disk_must_be_on_the_shared_storage(api, service, tmp_path):
    raw = disk_file(api, service, "local.raw")
    service.vms.shared_storage = tmp_path / "cluster-shared"     # as the cluster runtime
    refused(api.post("/v1/vms/n1/disks", json={"path": raw, "shared": True}),
            "not on the cluster's shared storage")
    service.vms.shared_storage = root(service)
    assert api.post("/v1/vms/n1/disks", json={"path": raw, "shared": True}).status_code == 201


def test_checkpoint_clone_export_and_storage_migration_refuse_a_shared_disk(api, service,
                                                                         tmp_path):
    path = disk_file(api, service, "quorum.raw")
    assert api.post("/v1/vms/n1/disks", json={"path": path, "shared": True}).status_code == 201
    refused(api.post("/v1/vms/n1/checkpoints", json={}), "shared disk", "checkpoints")
    refused(api.post("/v1/vms/n1/clone", json={"new_name": "n9"}), "shared disk", "clone")
    refused(api.post("/v1/vms/n1/export", json={"directory": str(tmp_path / "x")}),
            "shared disk", "export")
    assert not (tmp_path / "x").exists() and "n9" not in definitions(service)
    definition = definitions(service)["n1"]
    assert "--with-storage" in shared_disk_refusals(definition, with_storage=True)[0]
    assert shared_disk_refusals(definition, with_storage=False) == []


def test_device_changes_of_a_vm_running_elsewhere_are_refused(api, service):
    # a cluster VM recorded running whose QEMU is on another host: changing only its
    # definition here would leave the running VM and the definition disagreeing
    path = disk_file(api, service, "quorum.raw")
    record = service.store.get_vm("n1")
    service.store.set_state(record.uuid, VmState.STARTING)
    service.store.set_state(record.uuid, VmState.RUNNING)
    before = definitions(service)
    response = api.post("/v1/vms/n1/disks", json={"path": path, "shared": True})
    assert response.status_code == 409, response.text
    assert "no QEMU of it" in response.json()["error"]["message"]     # standalone host
    assert definitions(service) == before


def test_vm_create_attaches_a_shared_disk_and_never_mixes_shared_with_plain(api, service):
    path = disk_file(api, service, "quorum.raw")
    kernel = str(root(service) / "vmlinuz")
    made = api.post("/v1/vms", json={"name": "c1", "kernel": kernel,
                                     "disks": [{"path": path, "shared": True}]})
    assert made.status_code == 201, made.text
    assert [(d["shared"], d["bus"]) for d in made.json()["disks"]] == [(True, "virtio-scsi")]
    before = definitions(service)
    refused(api.post("/v1/vms", json={"name": "c2", "kernel": kernel,
                                      "disks": [{"path": path}]}), "add it with --shared")
    plain = disk_file(api, service, "plain.raw")
    assert api.post("/v1/vms", json={"name": "c3", "kernel": kernel,
                                     "disks": [{"path": plain}]}).status_code == 201
    refused(api.post("/v1/vms", json={"name": "c4", "kernel": kernel,
                                      "disks": [{"path": plain, "shared": True}]}),
            "plain (not shared) disk of VM(s) c3")
    after = definitions(service)
    assert "c2" not in after and "c4" not in after and before["c1"] == after["c1"]


def test_cli_disk_option_takes_the_shared_flag():
    from parvisor.cli.disk_commands import disk_options
    assert disk_options(["/c/q.raw,shared"], [])["disks"] == [{"path": "/c/q.raw",
                                                               "shared": True}]


# --- cluster: a start that would clear another host's owner record ------------------------------
class _Kv:
    def __init__(self, items: dict[str, bytes]) -> None:
        self.items, self.txns = items, []

    def get(self, key: str):
        value = self.items.get(key)
        return None if value is None else SimpleNamespace(value=value, mod_revision=7)

    def txn(self, compares, ops) -> None:
        self.txns.append(ops)


@pytest.mark.parametrize("member,phase,message", [
    (False, "stopped", "not a cluster member now"),
    (True, "running", "is running on host h2"),
])
def test_start_refuses_a_vm_another_host_may_still_run(member, phase, message):
    # these refusals used StateError with a free message, which it does not take: a 500
    keys = Keys("/parvisor/c/")
    record = SimpleNamespace(name="n1", uuid=UUID)
    items = {keys.owner(UUID): json.dumps({"host": "h2"}).encode(),
             keys.status(UUID): json.dumps({"revision": 7, "phase": phase}).encode()}
    if member:
        items[keys.member("h2")] = b"{}"
    manager = SimpleNamespace(store=SimpleNamespace(kv=_Kv(items), keys=keys))
    manager._cluster_doc = lambda kind, vm_uuid: ClusterVmManager._cluster_doc(
        manager, kind, vm_uuid)
    with pytest.raises(OwnedElsewhere, match=message) as refused:
        ClusterVmManager._release_stopped_owner(manager, record)
    assert refused.value.http_status == 409 and not manager.store.kv.txns
