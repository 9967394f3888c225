"""Cluster wiring without a running cluster: the [cluster] config section, HA policy in
the VM definition (schema v5), the snapshot's view of it, and the etcd store's
checkpoint documents on a real single etcd member."""

from __future__ import annotations

import json
import uuid

import pytest

from parvisor.cluster.etcd_env import disks_on, parse_snapshot
from parvisor.cluster.etcd_kv import KeyValue
from parvisor.cluster.model import Priority
from parvisor.cluster.settings import ClusterSettings
from parvisor.config import load_config
from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.model.vm import VmDefinition, upgrade_definition
from parvisor.store.etcd import EtcdStore, Keys

TABLE = {"name": "prod", "endpoints": ["https://10.0.0.1:2379"], "ca": "/p/ca.crt",
         "cert": "/p/h.crt", "key": "/p/h.key"}
KERNEL = {"kind": "kernel", "kernel": "/k", "initrd": None, "cmdline": ""}


def test_settings_round_trip_through_config_toml(tmp_path):
    settings = ClusterSettings.from_table({**TABLE, "shared_storage": "/shared"}, "h1")
    (tmp_path / "config.toml").write_text('host_name = "h1"\n' + settings.render())
    config = load_config(tmp_path)
    again = ClusterSettings.from_table(config.cluster, config.host_name)
    assert again == settings and again.host == "h1" and again.lease_ttl_s == 8.0


@pytest.mark.parametrize("change, message", [
    ({"endpoints": ["http://10.0.0.1:2379"]}, "https"),
    ({"fence_margin_s": 9.0}, "fence_margin_s"),
    ({"keepalive_interval_s": 6.0}, "keepalive_interval_s"),
    ({"bogus": 1}, "unknown keys"),
    ({"name": "../x"}, "cluster name"),
])
def test_bad_cluster_sections_are_refused(change, message):
    with pytest.raises(InvalidInput, match=message):
        ClusterSettings.from_table({**TABLE, **change}, "h1")


def test_v4_definitions_get_default_ha_policy():
    v4 = {"schema_version": 4, "name": "old", "boot": KERNEL, "template": False}
    upgraded = VmDefinition.model_validate(upgrade_definition(v4))
    assert (upgraded.ha_priority, upgraded.anti_affinity, upgraded.preferred_hosts) == \
        ("medium", None, ())


def test_ha_policy_reaches_the_cluster_view(tmp_path):
    keys = Keys("/parvisor/c/")
    definition = VmDefinition(name="db", boot=KERNEL, ha=True, ha_priority="high",
                              anti_affinity="sql", preferred_hosts=("h2", "h1"))
    doc = {"definition": json.loads(definition.model_dump_json()), "state": "off",
           "desired_state": "running"}
    item = KeyValue(keys.vm(definition.uuid), json.dumps(doc).encode(), 5, 5)
    vm = parse_snapshot(keys, [item], 5).vms[definition.uuid]
    assert (vm.ha, vm.priority, vm.anti_affinity, vm.preferred_hosts, vm.desired_running) \
        == (True, Priority.HIGH, "sql", ("h2", "h1"), True)


def test_disks_outside_the_shared_path_are_not_protected(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "local"
    on_shared = {"disks": [{"path": str(shared / "a.qcow2")}]}
    mixed = {"disks": [{"path": str(shared / "a.qcow2")}, {"path": str(local / "b.qcow2")}]}
    assert disks_on(on_shared, shared) and not disks_on(mixed, shared)
    assert disks_on(mixed, None)      # no cluster storage configured: not judged


def test_bad_anti_affinity_group_is_refused():
    with pytest.raises(ValueError):
        VmDefinition(name="x", boot=KERNEL, anti_affinity="../g")




def test_etcd_store_checkpoints_follow_the_store_rules(etcd):
    store = EtcdStore(etcd.kv(), f"c{uuid.uuid4().hex[:8]}")
    vm = str(uuid.uuid4())
    store.put_checkpoint({"id": "a", "vm_uuid": vm, "name": "one", "parent": None,
                          "created": 1}, create=True, make_current=True)
    store.put_checkpoint({"id": "b", "vm_uuid": vm, "name": "two", "parent": "a",
                          "created": 2}, create=True, make_current=True)
    with pytest.raises(AlreadyExists):
        store.put_checkpoint({"id": "c", "vm_uuid": vm, "name": "one", "parent": "b",
                              "created": 3}, create=True)
    with pytest.raises(NotFound):
        store.put_checkpoint({"id": "z", "vm_uuid": vm, "name": "z"}, create=False)
    assert [d["id"] for d in store.list_checkpoints(vm)] == ["a", "b"]
    store.delete_checkpoint(vm, "a")
    assert store.list_checkpoints(vm)[0]["parent"] is None
    store.delete_checkpoint(vm, "b")
    assert store.current_checkpoint(vm) is None and store.list_checkpoints(vm) == []
