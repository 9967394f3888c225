"""A real 3-member etcd cluster on loopback (members started and killed by PID):
membership by lease, fencing tokens, leader loss and quorum loss."""

from __future__ import annotations

import shutil
import time

import pytest

from parvisor.cluster.env import ClusterUnavailable, HostRecord, VmStatus
from parvisor.cluster.etcd_env import EtcdEnv
from parvisor.cluster.etcd_kv import op_put
from parvisor.cluster.model import OwnerPhase, VmPhase
from parvisor.testing.etcd_fixture import EtcdCluster, wait_until

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd-server is not installed")


class NoLocalHost:
    """The etcd side only: these tests run no VMs."""

    def log(self, message: str) -> None:
        pass


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def env(cluster: EtcdCluster, host: str, name: str) -> EtcdEnv:
    return EtcdEnv(cluster.kv(timeout_s=1.0), name, host, NoLocalHost())  # type: ignore[arg-type]


def heal(cluster: EtcdCluster) -> None:
    for member in cluster.members:
        if member.proc is None:
            cluster.start_member(member)
    wait_until(lambda: all(cluster.writable([m]) for m in cluster.members), 20,
               "all members to serve writes again")


def test_lease_expiry_drops_membership(etcd3):
    e = env(etcd3, "h1", "lease")
    lease = e.lease_grant(2)
    e.register(lease, HostRecord("h1", 1 << 30, 2))
    assert "h1" in e.read().members
    started = time.monotonic()
    wait_until(lambda: "h1" not in e.read().members, 6, "the lease to expire")
    assert time.monotonic() - started <= 2 + 1.5      # TTL + etcd's expiry slack
    assert "h1" in e.read().hosts                      # registration stays, membership not
    assert not e.lease_keepalive(lease)


def test_stale_ownership_and_status_writes_are_rejected(etcd3):
    e = env(etcd3, "h1", "fencing")
    first = e.change_owner("vm1", 0, "h1", OwnerPhase.RUN, None)
    assert first is not None
    assert e.change_owner("vm1", 0, "h2", OwnerPhase.RUN, None) is None      # stale token
    assert e.read().owners["vm1"].host == "h1"
    lease = e.lease_grant(5)
    e.register(lease, HostRecord("h1", 1 << 30, 2))
    # failover requires the old owner's membership to be gone
    assert e.change_owner("vm1", first, "h2", OwnerPhase.RUN, "h1") is None
    e.lease_revoke(lease)
    second = e.change_owner("vm1", first, "h2", OwnerPhase.RUN, "h1")
    assert second is not None and second > first
    # the old owner (woken after a freeze) writes with its old token: rejected
    assert not e.write_status("vm1", VmStatus(VmPhase.RUNNING, first))
    assert e.write_status("vm1", VmStatus(VmPhase.RUNNING, second))
    assert e.read().statuses["vm1"].revision == second


def test_leader_kill_elects_a_new_leader_and_writes_continue(etcd3):
    wait_until(lambda: etcd3.leader() is not None, 10, "a leader")
    old = etcd3.leader()
    etcd3.kill_member(old)
    survivors = [m for m in etcd3.members if m is not old]
    wait_until(lambda: etcd3.leader() not in (None, old), 10, "a new leader")
    kv = etcd3.kv(timeout_s=2.0, members=survivors)
    ok, _, _ = kv.txn([], [op_put("/t/after-leader-loss", "1")])
    assert ok
    heal(etcd3)


def test_quorum_loss_stops_writes_and_heal_resumes_them(etcd3):
    kv = etcd3.kv(timeout_s=1.0)
    assert kv.txn([], [op_put("/t/before", "acked")])[0]
    for member in etcd3.members[1:]:
        etcd3.kill_member(member)
    with pytest.raises(ClusterUnavailable):
        kv.txn([], [op_put("/t/during", "x")])
    etcd3.start_member(etcd3.members[1])
    wait_until(lambda: etcd3.writable(etcd3.members[:2]), 20, "quorum to return")
    assert etcd3.kv(timeout_s=2.0, members=etcd3.members[:2]).get("/t/before").value == b"acked"
    heal(etcd3)
