"""Users' replication requests (parvisor.replication.requests) against a real one-member
etcd: what ``enable`` records (replica host, disks, sizes from qemu-img), that every
refusal of issue 9's "Bad input" reaches the user as one clear message with nothing
written, the live RPO in ``status``, ``disable`` during the initial sync, and the
failover requests (--force, none, --planned/--test through the coordinator)."""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest

from parvisor.cluster.etcd_kv import op_delete, op_put
from parvisor.errors import AlreadyExists, Busy, InvalidInput, NotFound, Refused, StateError
from parvisor.model.vm import VmDefinition
from parvisor.replication.placement import NoReplicaHost
from parvisor.replication.protocol import Mode, ReplicationRecord, State
from parvisor.replication.requests import (FailoverRefused, NeedsCluster,
                                           ReplicationRequests)
from parvisor.store.etcd import EtcdStore

KERNEL = {"kind": "kernel", "kernel": "/k"}
MIB = 1 << 20
NOW = 1_800_000_000.0


class Cluster:
    """One test's cluster prefix on the module's etcd, three hosts in two sites."""

    def __init__(self, etcd, tmp_path) -> None:
        self.store = EtcdStore(etcd.kv(), f"repl-{uuid.uuid4().hex[:8]}")
        self.kv, self.keys, self.tmp = self.store.kv, self.store.keys, tmp_path
        self.events: list[str] = []
        self.vms = SimpleNamespace(store=self.store, config=SimpleNamespace(host_name="h1"),
                                   replication=None,
                                   event=lambda kind, message, record=None:
                                   self.events.append(message))
        for name, site, free in (("h1", "A", 10_000 * MIB), ("h2", "A", 20_000 * MIB),
                                 ("h3", "B", 5_000 * MIB)):
            self.host(name, site, free)

    def host(self, name: str, site: str, free: int | None, member: bool = True) -> None:
        doc = json.dumps({"name": name, "memory_bytes": 8 << 30, "cpus": 4, "site": site,
                          "replica_free_bytes": free})
        self.kv.txn([], [_put(self.keys.host(name), doc)]
                    + ([_put(self.keys.member(name), doc)] if member else []))

    def vm(self, name: str = "web", owner: str | None = "h1", *, size: str = "64M",
           ha: bool = True, shared: bool = False) -> VmDefinition:
        disk = self.tmp / f"{name}-d0.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size],
                       check=True)
        disks = [{"id": "d0", "path": str(disk)},
                 {"id": "cd", "path": None, "media": "cdrom", "bus": "ide"},
                 {"id": "base", "path": str(disk), "readonly": True}]
        if shared:
            disks.append({"id": "quorum", "path": str(self.tmp / "q.raw"), "format": "raw",
                          "bus": "virtio-scsi", "shared": True})
        definition = VmDefinition(name=name, boot=KERNEL, ha=ha, disks=disks)
        self.store.create_vm(definition)
        if owner:
            self.kv.txn([], [_put(self.keys.owner(definition.uuid),
                                  json.dumps({"host": owner, "phase": "run"}))])
        return definition

    def requests(self, now: float = NOW) -> ReplicationRequests:
        return ReplicationRequests(self.vms, clock=lambda: now)

    def record(self, vm: VmDefinition) -> ReplicationRecord | None:
        return self.requests().read(vm.uuid)

    def put(self, record: ReplicationRecord) -> None:
        self.kv.txn([], [_put(self.keys.replication(record.vm_uuid), record.to_json())])


def _put(key: str, value: str) -> dict:
    return op_put(key, value)


@pytest.fixture
def cluster(etcd, tmp_path):
    return Cluster(etcd, tmp_path)


def replicated(vm: VmDefinition, state: State, mode: Mode = Mode.SYNC, **extra) -> ReplicationRecord:
    return ReplicationRecord(vm.uuid, vm.name, mode, "h1", "h3", state=state,
                             interval_s=300 if mode == Mode.ASYNC else 0,
                             disk_bytes=64 * MIB, **extra)


# --- enable ------------------------------------------------------------------------------
def test_enable_records_the_replica_in_another_site_with_the_writable_disks(cluster):
    vm = cluster.vm()
    answer = cluster.requests().enable("web", "sync", stall_limit_s=3)
    record = cluster.record(vm)
    assert (record.mode, record.primary, record.replica, record.state) == \
        (Mode.SYNC, "h1", "h3", State.ENABLING)     # h3: site B, though h2 has more room
    # the CD drive and the read-only disk are not replicated
    assert record.images == {"h1": {"d0": str(cluster.tmp / "web-d0.qcow2")}}
    assert record.disk_bytes == 64 * MIB and record.stall_limit_s == 3
    assert answer["replica"] == "h3" and answer["rpo_s"] is None
    assert "initial sync" in answer["failover"] and not answer["failover_allowed"]
    assert answer["protection"].startswith("not protected")
    assert any("sync replication h1 -> h3" in e for e in cluster.events)


def test_enable_async_with_a_chosen_host_and_interval(cluster):
    vm = cluster.vm()
    cluster.requests().enable("web", "async", interval="30s", to="h2")
    record = cluster.record(vm)
    assert (record.mode, record.replica, record.interval_s) == (Mode.ASYNC, "h2", 30)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"to": "h1"}, InvalidInput, "protects nothing"),                 # same host
    ({"to": "h9"}, NotFound, "h9"),
    ({"interval": "5m"}, InvalidInput, "async"),                       # sync + interval
    ({"mode": "async", "interval": "1h"}, InvalidInput, "30s"),
    ({"mode": "mirror"}, InvalidInput, "sync or async"),
    ({"stall_limit_s": 0}, InvalidInput, "stall limit"),
])
def test_bad_enable_requests_write_nothing(cluster, kwargs, error, words):
    vm = cluster.vm()
    args = {"mode": "sync", **kwargs}
    with pytest.raises(error, match=words):
        cluster.requests().enable("web", **args)
    assert cluster.record(vm) is None and not cluster.events


def test_no_room_is_refused_per_host(cluster):
    vm = cluster.vm(size="6G")                 # h3 has 5000 MiB free
    with pytest.raises(InvalidInput, match="h3: no room: needs 6144 MiB"):
        cluster.requests().enable("web", "sync", to="h3")
    cluster.host("h2", "A", 1 * MIB)
    with pytest.raises(NoReplicaHost, match="h2: no room.*h3: no room"):
        cluster.requests().enable("web", "sync")
    assert cluster.record(vm) is None


def test_hosts_down_in_maintenance_or_silent_are_not_replicas(cluster):
    vm = cluster.vm()
    cluster.kv.txn([], [_put(cluster.keys.maintenance("h3"), "drain")])
    cluster.host("h2", "A", None)              # published no free space
    with pytest.raises(NoReplicaHost) as refused:
        cluster.requests().enable("web", "sync")
    assert refused.value.details["refusals"] == {
        "h1": "it is the primary (replica on the same host protects nothing)",
        "h2": "has not published the free space of its replica storage",
        "h3": "in maintenance"}
    assert cluster.record(vm) is None


def test_shared_disk_twice_and_hostless_vms_are_refused(cluster):
    shared = cluster.vm("quorum-vm", shared=True)
    with pytest.raises(InvalidInput, match="shared .*quorum"):
        cluster.requests().enable("quorum-vm", "sync")
    assert cluster.record(shared) is None
    vm = cluster.vm()
    cluster.requests().enable("web", "sync")
    first = cluster.record(vm)
    with pytest.raises(AlreadyExists, match="already enabled \\(sync to h3, enabling\\)"):
        cluster.requests().enable("web", "async")
    assert cluster.record(vm) == first
    cluster.vm("cold", owner=None)
    with pytest.raises(Refused, match="start it first"):
        cluster.requests().enable("cold", "sync")


def test_disks_on_another_host_are_enabled_there(cluster):
    vm = cluster.vm(owner=None)
    cluster.kv.txn([], [_put(cluster.keys.disk_host(vm.uuid), "h2")])
    with pytest.raises(Refused, match="on host h2: enable its replication there"):
        cluster.requests().enable("web", "sync")
    cluster.vms.config.host_name = "h2"        # on h2: primary h2, replica in site B
    cluster.requests().enable("web", "sync")
    assert (cluster.record(vm).primary, cluster.record(vm).replica) == ("h2", "h3")


def test_enable_again_after_disabled_bumps_the_generation(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.DISABLED, generation=4))
    cluster.requests().enable("web", "sync")
    assert (cluster.record(vm).generation, cluster.record(vm).state) == (5, State.ENABLING)


def test_owner_moving_meanwhile_writes_nothing(cluster, monkeypatch):
    vm = cluster.vm()
    requests = cluster.requests()
    sizes = requests.disk_size

    def size_while_migrating(disk):        # the VM moves while qemu-img reads its disk
        cluster.kv.txn([], [_put(cluster.keys.owner(vm.uuid),
                                 json.dumps({"host": "h2", "phase": "run"}))])
        return sizes(disk)
    requests.disk_size = size_while_migrating
    with pytest.raises(Refused, match="changed while"):
        requests.enable("web", "sync")
    assert cluster.record(vm) is None


def test_a_migrating_vm_is_enabled_after_its_move(cluster):
    vm = cluster.vm()
    moving = SimpleNamespace(terminal=False, source="h1", destination="h2")
    cluster.vms.migrations = SimpleNamespace(read=lambda vm_uuid: moving)
    with pytest.raises(Busy, match="migrating \\(h1 -> h2\\)"):
        cluster.requests().enable("web", "sync")
    assert cluster.record(vm) is None
    moving.terminal = True
    cluster.requests().enable("web", "sync")
    assert cluster.record(vm).state == State.ENABLING


# --- status ------------------------------------------------------------------------------
@pytest.mark.parametrize("record, rpo, allowed", [
    (dict(state=State.IN_SYNC), 0.0, True),
    (dict(state=State.IN_SYNC, mode=Mode.ASYNC, last_consistent_at=NOW - 42), 42.0, True),
    (dict(state=State.BROKEN, last_consistent_at=NOW - 600), 600.0, False),
    (dict(state=State.INITIAL_SYNC, bytes_done=16 * MIB), None, False),
])
def test_status_gives_the_live_rpo_and_the_failover_cost(cluster, record, rpo, allowed):
    vm = cluster.vm()
    cluster.put(replicated(vm, **record))
    status = cluster.requests().status("web")
    assert status["rpo_s"] == rpo and status["failover_allowed"] is allowed
    assert status["primary_up"] and status["replica_up"]
    if record["state"] == State.INITIAL_SYNC:
        assert status["progress_percent"] == 25
    if record["state"] == State.BROKEN:
        assert "would lose every write" in status["failover"]


def test_status_of_an_unreplicated_vm_says_how_to_enable_it(cluster):
    cluster.vm()
    with pytest.raises(NotFound, match="not replicated .*replication enable web"):
        cluster.requests().status("web")


def test_status_lists_each_disks_copies_and_export(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.IN_SYNC, images={"h1": {"d0": "/a/d0.qcow2"},
                                                      "h3": {"d0": "/r/d0.qcow2"}},
                           exports={"d0": "nbd://10.0.0.3:10809"}))
    assert cluster.requests().status("web")["disks"] == [
        {"id": "d0", "primary_path": "/a/d0.qcow2", "replica_path": "/r/d0.qcow2",
         "export": "nbd://10.0.0.3:10809"}]


# --- disable -----------------------------------------------------------------------------
def test_disable_during_the_initial_sync_is_defined_and_twice_refused(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.INITIAL_SYNC))
    answer = cluster.requests().disable("web")
    assert cluster.record(vm).state == State.DISABLING
    assert "initial sync cancelled" in answer["note"] and "keeps running" in answer["note"]
    with pytest.raises(AlreadyExists, match="already being disabled"):
        cluster.requests().disable("web")


def test_disable_is_applied_to_a_record_the_hosts_keep_updating(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.INITIAL_SYNC))
    requests = cluster.requests()
    real_txn, raced = cluster.kv.txn, []

    def txn(compare, success, failure=None):     # progress lands first, once
        if not raced:
            raced.append(True)
            current = requests.read(vm.uuid)
            cluster.put(replace(current, bytes_done=32 * MIB))
        return real_txn(compare, success, failure)
    cluster.kv.txn = txn
    requests.disable("web")
    after = cluster.record(vm)
    assert after.state == State.DISABLING and after.bytes_done == 32 * MIB


# --- failover ----------------------------------------------------------------------------
def _primary_down(cluster) -> None:
    cluster.kv.txn([], [op_delete(cluster.keys.member("h1"))])      # its lease expired


async def test_a_running_primary_is_moved_with_planned_not_forced(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.BROKEN, last_consistent_at=NOW - 60))
    for force in (False, True):
        with pytest.raises(FailoverRefused, match="primary h1 is running.*--planned"):
            await cluster.requests().failover("web", force=force)
    assert not cluster.record(vm).force_failover


async def test_a_broken_replica_fails_over_only_when_forced(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.BROKEN, last_consistent_at=NOW - 60))
    _primary_down(cluster)
    with pytest.raises(FailoverRefused, match="would lose every write.*--force"):
        await cluster.requests().failover("web")
    assert not cluster.record(vm).force_failover
    answer = await cluster.requests().failover("web", force=True)
    assert cluster.record(vm).force_failover and answer["failover_allowed"]
    assert "FORCED" in answer["failover"] and "h3" in answer["note"]
    assert answer["primary_up"] is False


async def test_force_is_refused_where_it_cannot_help_or_is_not_needed(cluster):
    vm = cluster.vm()
    _primary_down(cluster)
    cluster.put(replicated(vm, State.IN_SYNC))
    with pytest.raises(StateError, match="not needed"):
        await cluster.requests().failover("web", force=True)
    cluster.put(replicated(vm, State.INITIAL_SYNC))
    with pytest.raises(StateError, match="initial sync"):
        await cluster.requests().failover("web", force=True)
    assert not cluster.record(vm).force_failover


async def test_unforced_failover_of_an_in_sync_replica_is_the_managers(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.IN_SYNC))
    _primary_down(cluster)
    answer = await cluster.requests().failover("web")
    assert "restarts web on h3" in answer["note"] and "no acknowledged write" in answer["note"]
    cold = cluster.vm("cold", ha=False)
    cluster.put(replicated(cold, State.IN_SYNC))
    with pytest.raises(FailoverRefused, match="not HA"):
        await cluster.requests().failover("cold")


async def test_planned_and_test_failover_go_to_the_coordinator(cluster):
    cluster.vm()
    with pytest.raises(NeedsCluster, match="planned failover needs"):
        await cluster.requests().failover("web", planned=True)
    calls = []

    class Coordinator:
        async def planned_failover(self, name):
            calls.append(("planned", name))
            return {"vm": name, "result": "moved to h3"}

        async def test_failover(self, name):
            calls.append(("test", name))

        async def stop_test_failover(self, name):
            calls.append(("stop", name))
            return "test copy deleted"
    cluster.vms.replication = Coordinator()
    assert (await cluster.requests().failover("web", planned=True))["result"] == "moved to h3"
    assert (await cluster.requests().failover("web", test=True))["vm"] == "web"
    assert (await cluster.requests().failover("web", test_stop=True))["result"] == \
        "test copy deleted"
    assert calls == [("planned", "web"), ("test", "web"), ("stop", "web")]
    with pytest.raises(InvalidInput, match="--force, --planned"):
        await cluster.requests().failover("web", force=True, planned=True)


def test_a_standalone_host_refuses_clearly():
    vms = SimpleNamespace(store=SimpleNamespace(), config=SimpleNamespace(host_name="h1"))
    with pytest.raises(NeedsCluster, match="not a cluster member"):
        ReplicationRequests(vms)


def test_wall_clock_skew_never_gives_a_negative_rpo(cluster):
    vm = cluster.vm()
    cluster.put(replicated(vm, State.LAGGING, mode=Mode.ASYNC, last_consistent_at=NOW + 5))
    assert cluster.requests(now=NOW).status("web")["rpo_s"] == 0.0


def test_planned_failover_is_the_primarys_and_test_failover_the_replicas(cluster):
    vm = cluster.vm()
    requests = cluster.requests()
    assert requests.acting_host("web", planned=True) is None      # not replicated yet
    cluster.put(replicated(vm, State.IN_SYNC))
    assert requests.acting_host("web", planned=True) == "h1"
    assert requests.acting_host("web", test=True) == "h3"
    assert requests.acting_host("web", test_stop=True) == "h3"
    assert requests.acting_host("web") is None                    # etcd only: any member
