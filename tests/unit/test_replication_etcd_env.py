"""The real environment's replication writes on one real etcd member: a failover to the
replica moves the owner, the replication record (its new generation) and the disk host
together or not at all, and the snapshot the manager decides from carries the record
and the disk host."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from parvisor.cluster.agent import Agent
from parvisor.cluster.env import HostRecord
from parvisor.cluster.etcd_env import EtcdEnv
from parvisor.cluster.etcd_kv import op_put
from parvisor.cluster.model import ClusterPolicy, OwnerPhase
from parvisor.cluster.vm_ops import ClusterVmManager, replication_line
from parvisor.errors import Busy
from parvisor.model.states import VmState
from parvisor.model.vm import DiskSpec, VmDefinition
from parvisor.replication.protocol import Mode, ReplicationRecord, State
from parvisor.store.base import VmRecord
from parvisor.store.etcd import EtcdStore

KERNEL = {"kind": "kernel", "kernel": "/k", "initrd": None, "cmdline": ""}


class _Quiet:
    """The LocalHost part the etcd calls use: only logging."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture
def cluster(etcd):
    """A fresh cluster prefix with one replicated VM owned by h1 (member h1 gone,
    h2 its in-sync replica, disks on h1)."""
    name = f"c{uuid.uuid4().hex[:8]}"
    kv = etcd.kv()
    env = EtcdEnv(kv, name, "h2", _Quiet())
    definition = VmDefinition(name="db", boot=KERNEL, ha=True)
    EtcdStore(kv, name).create_vm(definition)
    vm = definition.uuid
    env.change_owner(vm, 0, "h1", OwnerPhase.RUN, None)
    record = ReplicationRecord(vm, "db", Mode.SYNC, primary="h1", replica="h2",
                               state=State.IN_SYNC, last_consistent_at=1.0,
                               images={"h2": {"disk0": "/replica/db/disk0.qcow2"}})
    kv.txn([], [op_put(env.keys.replication(vm), record.to_json()),
                op_put(env.keys.disk_host(vm), "h1")])
    return env, vm


def _state(env: EtcdEnv, vm: str) -> tuple:
    """(owner host, replication generation + primary, disk host) as etcd holds them."""
    kv, keys = env.kv, env.keys
    owner = json.loads(kv.get(keys.owner(vm)).value)["host"]
    record = json.loads(kv.get(keys.replication(vm)).value)
    return owner, record["generation"], record["primary"], kv.get(keys.disk_host(vm)).value.decode()


def _failover(env: EtcdEnv, vm: str, *, owner_rev: int | None = None,
              repl_rev: int | None = None) -> int | None:
    snap = env.read()
    current = snap.replications[vm]
    return env.fail_over_to_replica(
        vm, snap.owners[vm].revision if owner_rev is None else owner_rev,
        current.revision if repl_rev is None else repl_rev, "h2",
        current.failed_over("failover from h1"), "h1")


def test_snapshot_carries_the_replication_record_and_the_disk_host(cluster):
    env, vm = cluster
    snap = env.read()
    record = snap.replications[vm]
    assert (record.primary, record.replica, record.state) == ("h1", "h2", State.IN_SYNC)
    assert record.revision == env.kv.get(env.keys.replication(vm)).mod_revision
    assert record.images == {"h2": {"disk0": "/replica/db/disk0.qcow2"}}
    assert snap.vms[vm].disk_host == "h1" and snap.vms[vm].on_shared_storage is False


def test_failover_moves_owner_record_and_disk_host_in_one_revision(cluster):
    env, vm = cluster
    revision = _failover(env, vm)
    assert revision is not None
    assert _state(env, vm) == ("h2", 2, "h2", "h2")
    snap = env.read()
    assert snap.owners[vm].revision == snap.replications[vm].revision == revision
    assert snap.replications[vm].state == State.FAILED_OVER
    assert snap.owners[vm].phase == OwnerPhase.RUN


@pytest.mark.parametrize("stale", ["owner", "replication", "member"])
def test_any_failed_compare_changes_nothing(cluster, stale):
    env, vm = cluster
    before = _state(env, vm)
    snap = env.read()
    if stale == "owner":
        # the owner moved after the manager read it: its token is stale
        env.change_owner(vm, snap.owners[vm].revision, "h1", OwnerPhase.RUN, None)
        result = _failover(env, vm, owner_rev=snap.owners[vm].revision)
    elif stale == "replication":
        env.write_replication(vm, snap.replications[vm].revision, snap.replications[vm])
        result = _failover(env, vm, repl_rev=snap.replications[vm].revision)
    else:
        env.kv.txn([], [op_put(env.keys.member("h1"), "{}")])     # h1 is back
        result = _failover(env, vm)
    assert result is None
    assert _state(env, vm) == before


def test_write_replication_is_conditioned_on_the_record_revision(cluster):
    env, vm = cluster
    record = env.read().replications[vm]
    broken = record.to(State.BROKEN, reason="replica away")
    assert env.write_replication(vm, record.revision, broken)
    assert not env.write_replication(vm, record.revision, record)     # stale now
    assert env.read().replications[vm].state == State.BROKEN


# --- the host side (ClusterVmManager) on the same etcd ---------------------------------
def _manager(etcd, host: str, shared: Path | None) -> ClusterVmManager:
    """The parts of a ClusterVmManager these paths use: store, host name, shared path."""
    manager = object.__new__(ClusterVmManager)
    manager.store = EtcdStore(etcd.kv(), f"c{uuid.uuid4().hex[:8]}")
    manager.config = SimpleNamespace(host_name=host)
    manager.shared_storage = shared
    manager.migrations = None
    return manager


def _vm_with_disk(manager: ClusterVmManager, path: Path) -> VmRecord:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    definition = VmDefinition(name="web", boot=KERNEL, ha=True,
                              disks=[DiskSpec(id="disk0", path=str(path))])
    return manager.store.create_vm(definition)


def test_a_vm_created_with_local_disks_runs_where_they_are(etcd, tmp_path):
    manager = _manager(etcd, "h1", tmp_path / "shared")
    record = _vm_with_disk(manager, tmp_path / "local" / "web.qcow2")
    manager.event("created", "web: created", record)
    assert manager.disk_host(record.uuid) == "h1"
    assert manager._ha_status(record, None) == "not protected: disks on local storage"
    other = _manager(etcd, "h2", tmp_path / "shared")
    other.store = manager.store
    other.event("edited", "web: edited", record)      # never claimed by another host
    assert manager.disk_host(record.uuid) == "h1"


def test_shared_disks_and_disks_this_host_lacks_record_no_disk_host(etcd, tmp_path):
    manager = _manager(etcd, "h1", tmp_path / "shared")
    shared = _vm_with_disk(manager, tmp_path / "shared" / "web.qcow2")
    manager.event("created", "web: created", shared)
    assert manager.disk_host(shared.uuid) is None
    assert manager._ha_status(shared, None) == "protected"
    elsewhere = shared.definition.model_copy(update={"disks": (
        DiskSpec(id="disk0", path=str(tmp_path / "not-here" / "web.qcow2")),)})
    edited = manager.store.update_definition(elsewhere, shared.generation)
    manager.event("edited", "web: edited", edited)     # the file is on another host
    assert manager.disk_host(shared.uuid) is None


def test_without_shared_storage_every_disk_is_local(etcd, tmp_path):
    manager = _manager(etcd, "h1", None)
    record = _vm_with_disk(manager, tmp_path / "local" / "web.qcow2")
    manager.event("created", "web: created", record)
    assert manager.disk_host(record.uuid) == "h1"


def test_the_new_primary_starts_from_its_replica_images(etcd, tmp_path):
    manager = _manager(etcd, "h2", None)
    record = _vm_with_disk(manager, tmp_path / "h1" / "web.qcow2")
    image = str(tmp_path / "h2" / "replicas" / "disk0.qcow2")
    replication = ReplicationRecord(record.uuid, "web", Mode.SYNC, primary="h2",
                                    replica="h1", generation=2, state=State.FAILED_OVER,
                                    images={"h1": {"disk0": record.definition.disks[0].path},
                                            "h2": {"disk0": image}})
    manager.store.kv.txn([], [op_put(manager.store.keys.replication(record.uuid),
                                     replication.to_json())])
    started = manager._on_replica_images(record)
    assert [d.path for d in started.definition.disks] == [image]
    assert manager.store.get_vm_by_uuid(record.uuid).definition.disks[0].path == image
    assert manager._on_replica_images(started) == started      # nothing left to change
    assert "no replica since the failover" in manager._ha_status(started, None,
                                                                 replication)
    assert replication_line(replication) == "sync h2 -> h1, failed-over (generation 2)"


def test_the_old_primary_keeps_its_paths(etcd, tmp_path):
    manager = _manager(etcd, "h1", None)
    record = _vm_with_disk(manager, tmp_path / "h1" / "web.qcow2")
    replication = ReplicationRecord(record.uuid, "web", Mode.ASYNC, primary="h2",
                                    replica="h1", interval_s=30, state=State.LAGGING,
                                    images={"h2": {"disk0": "/elsewhere.qcow2"}})
    manager.store.kv.txn([], [op_put(manager.store.keys.replication(record.uuid),
                                     replication.to_json())])
    assert manager._on_replica_images(record) == record


class _Host(_Quiet):
    """This host's processes: none run; starts are recorded, never performed."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []
        self.lease: int | None = None

    def local_vms(self) -> list:
        return []

    def start_vm(self, vm) -> None:
        self.started.append(vm.name)

    def feed_watchdog(self, deadline: float, vm_uuids: list[str]) -> None:
        pass

    def save_lease(self, lease_id: int | None) -> None:
        self.lease = lease_id

    def load_lease(self) -> int | None:
        return self.lease


def test_the_agent_never_starts_a_copy_whose_record_names_another_primary(etcd):
    name, host = f"c{uuid.uuid4().hex[:8]}", _Host()
    kv = etcd.kv()
    env = EtcdEnv(kv, name, "h1", host)
    store = EtcdStore(kv, name)
    record = store.create_vm(VmDefinition(name="db", boot=KERNEL, ha=True))
    store.set_state(record.uuid, VmState.OFF, "", desired_state="running")
    env.change_owner(record.uuid, 0, "h1", OwnerPhase.RUN, None)     # owner: us
    replication = ReplicationRecord(record.uuid, "db", Mode.SYNC, primary="h2",
                                    replica="h1", generation=3, state=State.IN_SYNC)
    kv.txn([], [op_put(env.keys.replication(record.uuid), replication.to_json())])
    agent = Agent(env, HostRecord("h1", 8 << 30, 4), ClusterPolicy())
    try:
        for _ in range(3):
            agent.next_keepalive = float("-inf")
            agent.tick()
        assert host.started == []
        refusals = [line for line in host.lines if "not starting db" in line]
        assert refusals == ["h1: not starting db: replication names h2 its primary "
                            "(generation 3)"]
    finally:
        env.lease_revoke(agent.lease_id)


def test_a_replicated_vm_is_not_deleted_until_replication_is_disabled(etcd, tmp_path):
    manager = _manager(etcd, "h1", None)
    record = _vm_with_disk(manager, tmp_path / "h1" / "web.qcow2")
    replication = ReplicationRecord(record.uuid, "web", Mode.SYNC, primary="h1",
                                    replica="h2", state=State.IN_SYNC)
    manager.store.kv.txn([], [op_put(manager.store.keys.replication(record.uuid),
                                     replication.to_json())])
    with pytest.raises(Busy, match="replication disable web"):
        asyncio.run(manager.delete("web"))
    assert manager.store.get_vm("web").uuid == record.uuid       # nothing changed
    assert (tmp_path / "h1" / "web.qcow2").exists()


def test_cluster_join_gives_vms_with_local_disks_this_host_as_disk_host(etcd, tmp_path):
    """Moved in by ``cluster join``: a VM whose disk stays on this host's local storage
    can only run here; one on shared storage (or without disk files) can run anywhere."""
    from parvisor.cluster.admin import move_definitions
    from parvisor.cluster.settings import ClusterSettings
    from parvisor.config import HostConfig
    from parvisor.store.sqlite import SqliteStore
    config = HostConfig(state_dir=tmp_path, host_name="b")
    shared = tmp_path / "shared"
    local_store = SqliteStore(config.database)
    for name, disk in (("local", tmp_path / "local" / "a.qcow2"), ("onshared",
                                                                   shared / "b.qcow2")):
        local_store.create_vm(VmDefinition(name=name, boot=KERNEL, disks=[
            DiskSpec(id="disk0", path=str(disk))]))
    local_store.create_vm(VmDefinition(name="nodisk", boot=KERNEL))
    local_store.close()
    cluster = f"c{uuid.uuid4().hex[:8]}"
    settings = ClusterSettings(name=cluster, host="b", endpoints=(), ca=tmp_path,
                               cert=tmp_path, key=tmp_path, shared_storage=shared)
    kv = etcd.kv()
    assert sorted(move_definitions(config, settings, kv)) == ["local", "nodisk", "onshared"]
    store = EtcdStore(kv, cluster)
    hosts = {vm.name: kv.get(store.keys.disk_host(vm.uuid)) for vm in store.list_vms()}
    assert hosts["local"].value.decode() == "b"
    assert hosts["onshared"] is None and hosts["nodisk"] is None
