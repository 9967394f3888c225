"""The cluster manager's decisions for replicated HA VMs (pure ``decide`` on hand-built
views), the failover transaction in the simulator's etcd, and the GEN invariant."""

from __future__ import annotations

from dataclasses import replace

import pytest

from parvisor.cluster.decide import decide
from parvisor.cluster.model import (ClusterPolicy, ClusterView,
                                    FailoverToReplica, HostView, MarkError, Owner, PlaceVm,
                                    ReverseReplication, VmPhase, VmView)
from parvisor.replication.protocol import Mode, ReplicationRecord, State, request_force
from parvisor.testing.cluster_sim import (InvariantViolation, ScriptEvent, SimHostEnv,
                                          build_simulation, no_wall_clock)

GIB = 1 << 30


def host(name, member=True, **kw) -> HostView:
    kw.setdefault("shared_storage", False)
    kw.setdefault("memory_bytes", 8 * GIB)
    return HostView(name=name, member=member, cpus=4, **kw)


def fenced(name) -> HostView:
    return host(name, member=False, lost_seen_at=80.0, fenced=True)


def rep(state=State.IN_SYNC, mode=Mode.SYNC, **kw) -> ReplicationRecord:
    kw.setdefault("last_consistent_at", 50.0)
    kw.setdefault("revision", 31)
    return ReplicationRecord("u-db", "db", mode, "h1", "h2", state=state,
                             interval_s=30 if mode == Mode.ASYNC else 0,
                             disk_bytes=4 * GIB, **kw)


def vm(owner="h1", replication=None, phase=VmPhase.RUNNING, **kw) -> VmView:
    return VmView(uuid="u-db", name="db", memory_bytes=GIB, vcpus=1, desired_running=True,
                  owner=Owner(owner, revision=12), phase=phase, ha=True,
                  on_shared_storage=False, replication=replication, **kw)


def run(hosts, vms) -> list:
    with no_wall_clock():
        return decide(ClusterView(100.0, ClusterPolicy(), tuple(hosts), tuple(vms)))


def test_fenced_primary_fails_over_to_the_replica_host_only_bumping_the_generation():
    [decision] = run([fenced("h1"), host("h2"), host("h3", memory_bytes=64 * GIB)],
                     [vm(replication=rep())])
    assert isinstance(decision, FailoverToReplica)
    assert (decision.host, decision.from_host) == ("h2", "h1")      # never h3
    assert (decision.expected_revision, decision.replication_revision) == (12, 31)
    assert (decision.record.primary, decision.record.replica) == ("h2", "h1")
    assert decision.record.generation == 2
    assert decision.record.state == State.FAILED_OVER
    text = decision.describe()
    assert "generation 1 -> 2" in text and "no acknowledged write lost" in text
    assert "owner r12, replication r31, h1 not a member" in text


def test_no_failover_before_the_fence():
    hosts = [host("h1", member=False, lost_seen_at=99.5), host("h2")]
    assert run(hosts, [vm(replication=rep())]) == []


def test_async_failover_reports_the_loss_window():
    [decision] = run([fenced("h1"), host("h2")],
                     [vm(replication=rep(State.LAGGING, Mode.ASYNC, rpo_s=70.0))])
    assert "last consistent point t=50.00" in decision.loss
    assert "70 s behind" in decision.loss


def test_broken_replica_waits_with_the_risk_and_goes_when_forced():
    broken = rep(State.BROKEN)
    [refused] = run([fenced("h1"), host("h2")], [vm(replication=broken)])
    assert isinstance(refused, MarkError) and refused.retryable
    assert "lose every write after it" in refused.reason
    # the same error is not written twice
    waiting = vm(replication=broken, phase=VmPhase.ERROR, error_reason=refused.reason,
                 retryable_error=True)
    assert run([fenced("h1"), host("h2")], [waiting]) == []
    [forced] = run([fenced("h1"), host("h2")],
                   [replace(waiting, replication=request_force(broken))])
    assert isinstance(forced, FailoverToReplica) and forced.loss.startswith("FORCED")
    assert not forced.record.force_failover         # a force is used once


def test_initial_sync_is_never_failed_over():
    [decision] = run([fenced("h1"), host("h2")],
                     [vm(replication=rep(State.INITIAL_SYNC, force_failover=True))])
    assert isinstance(decision, MarkError) and "initial sync" in decision.reason


@pytest.mark.parametrize("replica_host,why", [
    (host("h2", member=False), "not a member"),
    (host("h2", maintenance=True), "in maintenance"),
    (host("h2", memory_bytes=GIB // 2), "not enough memory"),
])
def test_replica_host_unable_to_take_it_waits_with_why(replica_host, why):
    [decision] = run([fenced("h1"), replica_host], [vm(replication=rep())])
    assert isinstance(decision, MarkError) and decision.retryable
    assert f"replica host h2: {why}" in decision.reason


def test_local_disks_without_replication_stay_not_protected():
    [decision] = run([fenced("h1"), host("h2")], [vm()])
    assert "disks on local storage: not protected" in decision.reason


def test_failover_limit_applies_to_replica_failovers_too():
    [decision] = run([fenced("h1"), host("h2")],
                     [vm(replication=rep(), failover_times=(90.0, 95.0, 99.0))])
    assert "limit reached" in decision.reason


def test_returning_primary_of_the_newest_generation_runs_its_own_copy():
    waiting = vm(replication=rep(State.BROKEN), phase=VmPhase.ERROR,
                 error_reason="host h1 failed; ...", retryable_error=True)
    assert run([host("h1"), host("h2")], [waiting]) == [
        PlaceVm("u-db", "db", "h1", "h1", 12, "host back")]


def test_a_replicated_vm_starts_only_on_its_primary():
    stopped = replace(vm(owner=None, replication=rep()), owner=Owner(None),
                      phase=VmPhase.STOPPED)
    hosts = [host("h1", memory_bytes=GIB // 2), host("h2"), host("h3")]
    [decision] = run(hosts, [replace(stopped, on_shared_storage=True)])
    assert isinstance(decision, MarkError)      # h1 is full; h2/h3 hold no newest copy
    hosts[0] = host("h1")
    assert run(hosts, [stopped])[0].host == "h1"


def failed_over(**kw) -> VmView:
    record = rep().failed_over("failover from h1")
    return vm(owner="h2", replication=replace(record, revision=40), **kw)


def test_old_primary_back_becomes_the_replica_incrementally():
    [decision] = run([host("h1"), host("h2"), host("h3", replica_free_bytes=99 * GIB)],
                     [failed_over()])
    assert isinstance(decision, ReverseReplication)
    assert decision.replication_revision == 40
    assert (decision.record.primary, decision.record.replica) == ("h2", "h1")
    assert decision.record.state == State.RESYNCING and not decision.record.full_resync


def test_old_primary_gone_a_host_with_room_gets_a_full_copy():
    hosts = [fenced("h1"), host("h2"), host("h3", replica_free_bytes=GIB),
             host("h4", replica_free_bytes=9 * GIB)]
    [decision] = run(hosts, [failed_over()])
    assert decision.record.replica == "h4" and decision.record.full_resync


def test_no_host_for_a_replica_runs_alone_and_waits():
    hosts = [fenced("h1"), host("h2"), host("h3")]          # h3 published nothing
    assert run(hosts, [failed_over()]) == []
    assert run([host("h1"), host("h2")], [failed_over(phase=VmPhase.PENDING)]) == []


# --- the failover transaction and GEN in the simulator -------------------------------
INITIAL = {
    "etcd": [{"name": "e1"}],
    "hosts": [{"name": "h1", "shared_storage": False}, {"name": "h2", "shared_storage": False}],
    "vms": [{"name": "db", "host": "h1", "shared_storage": False,
             "replication": {"mode": "sync", "replica": "h2"}}],
}


def test_failover_txn_changes_nothing_when_the_replication_record_moved_meanwhile():
    sim = build_simulation(INITIAL)
    env = SimHostEnv(sim, "h2")
    owner_rev = sim.etcd.mod_revision("owner/db-uuid")
    rep_rev = sim.etcd.mod_revision("replication/db-uuid")
    record = sim.replications(sim.etcd)["db-uuid"]
    # the primary committed "broken" after the manager read the record
    sim.etcd.put("replication/db-uuid", record.to(State.BROKEN))
    before = dict(sim.etcd.kv)
    assert env.fail_over_to_replica("db-uuid", owner_rev, rep_rev, "h2",
                                    record.failed_over("x"), "h9") is None
    assert sim.etcd.kv == before
    fresh = sim.replications(sim.etcd)["db-uuid"]
    assert env.fail_over_to_replica("db-uuid", owner_rev, fresh.revision, "h2",
                                    fresh.failed_over("x"), "h9") is not None
    assert sim.etcd.kv["owner/db-uuid"].value[0] == "h2"
    assert (sim.etcd.kv["owner/db-uuid"].mod_revision
            == sim.etcd.kv["replication/db-uuid"].mod_revision)     # one revision


def test_gen_invariant_catches_an_owner_moved_without_the_generation():
    sim = build_simulation(INITIAL)
    sim.run([], 1.0)
    sim.etcd.put("owner/db-uuid", ("h2", sim.etcd.kv["owner/db-uuid"].value[1]))
    with pytest.raises(InvariantViolation, match="GEN .* owned by h2, primary is h1"):
        sim.checker.step()


def test_gen_invariant_catches_a_stale_copy_starting():
    sim = build_simulation(INITIAL)
    sim.hosts["h1"].running.clear()
    with pytest.raises(InvariantViolation, match="GEN .* runs on \\['h2'\\]"):
        sim.start_process("h2", "db-uuid")


def test_simulated_engines_walk_enable_copy_lag_and_recover():
    initial = {**INITIAL, "vms": [
        {"name": "db", "host": "h1", "shared_storage": False,
         "replication": {"mode": "sync", "replica": "h2", "state": "enabling"}},
        {"name": "app", "host": "h1", "shared_storage": False,
         "replication": {"mode": "async", "replica": "h2", "interval": "30s"}}]}
    sim = build_simulation(initial)
    sim.run([ScriptEvent(20.0, "cut", ("h1", "h2")), ScriptEvent(40.0, "uncut", ("h1", "h2"))],
            70.0)
    log = "\n".join(line.split(" ", 2)[2] for line in sim.lines)
    for expected in ["h2 replication: db target ready",
                     "h1 replication: db full copy to h2 started",
                     "h1 replication: db copy to h2 done; in-sync",
                     "h1 replication: db broken (h2 unreachable since t=20.00)",
                     "h1 replication: app lagging (h2 unreachable)",
                     "h1 replication: db incremental copy to h2 started",
                     "h1 replication: app cycle shipped to h2 (consistent point t=60.00)"]:
        assert expected in log, expected
    states = {r.vm_name: r.state for r in sim.replications(sim.etcd).values()}
    assert states == {"db": State.IN_SYNC, "app": State.IN_SYNC}
