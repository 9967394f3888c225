"""The real environment's replication writes on one real etcd member: a failover to the
replica moves the owner, the replication record (its new generation) and the disk host
together or not at all, and the snapshot the manager decides from carries the record
and the disk host."""

from __future__ import annotations

import json
import uuid

import pytest

from parvisor.cluster.etcd_env import EtcdEnv
from parvisor.cluster.etcd_kv import op_put
from parvisor.cluster.model import OwnerPhase
from parvisor.model.vm import VmDefinition
from parvisor.replication.protocol import Mode, ReplicationRecord, State
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
