"""The pure decision engine, one rule per test, on hand-built views."""

from __future__ import annotations

import ast
import inspect

import pytest

from parvisor.cluster import decide as decide_module
from parvisor.cluster import model, placement
from parvisor.cluster.decide import decide
from parvisor.cluster.model import (AcknowledgeFence, ClusterPolicy, ClusterView, HostView,
                                    MarkError, Owner, OwnerPhase, PlaceVm, Priority,
                                    QuarantineHost, StopForDrain, VmPhase, VmView)
from parvisor.testing.cluster_sim import no_wall_clock

GIB = 1 << 30
POLICY = ClusterPolicy()


def host(name, member=True, mem=4, **kw) -> HostView:
    return HostView(name=name, member=member, memory_bytes=mem * GIB, cpus=4, **kw)


def vm(name, owner, mem=1, rev=10, phase=VmPhase.RUNNING, **kw) -> VmView:
    kw.setdefault("ha", True)
    return VmView(uuid=f"u-{name}", name=name, memory_bytes=mem * GIB, vcpus=1,
                  desired_running=True, owner=Owner(owner, kw.pop("owner_phase",
                                                                  OwnerPhase.RUN), rev),
                  phase=phase, **kw)


def view(hosts, vms, now=100.0) -> ClusterView:
    return ClusterView(now, POLICY, tuple(hosts), tuple(vms))


def dead(name, seen_at=90.0, **kw) -> HostView:
    return host(name, member=False, lost_seen_at=seen_at, **kw)


def test_nothing_happens_in_a_healthy_cluster():
    assert decide(view([host("h1"), host("h2")], [vm("a", "h1")])) == []


def test_no_recovery_before_grace_after_lease_loss():
    v = view([dead("h1", seen_at=99.0), host("h2")], [vm("a", "h1")], now=100.0)
    assert decide(v) == []          # 1.0 s < grace 1.5 s


def test_fence_acknowledged_then_failover_conditioned_on_token():
    v = view([dead("h1", seen_at=98.0), host("h2")], [vm("a", "h1", rev=42)])
    assert decide(v) == [AcknowledgeFence("h1", 98.0),
                         PlaceVm("u-a", "a", "h2", "h1", 42, "failover")]


def test_placement_prefers_free_memory_then_preferred_hosts_first():
    hosts = [dead("h1", fenced=True), host("h2", mem=8), host("h3", mem=4)]
    assert decide(view(hosts, [vm("a", "h1")]))[0].host == "h2"
    pref = vm("a", "h1", preferred_hosts=("h3",))
    assert decide(view(hosts, [pref]))[0].host == "h3"


def test_priority_order_when_capacity_is_short():
    hosts = [dead("h1", fenced=True), host("h2", mem=2)]
    vms = [vm("low", "h1", mem=2, priority=Priority.LOW),
           vm("high", "h1", mem=2, priority=Priority.HIGH)]
    out = decide(view(hosts, vms))
    assert out[0] == PlaceVm("u-high", "high", "h2", "h1", 10, "failover")
    assert isinstance(out[1], MarkError) and out[1].vm_name == "low" and out[1].retryable


def test_anti_affinity_is_hard():
    hosts = [dead("h1", fenced=True), host("h2", mem=8), host("h3", mem=2)]
    vms = [vm("n1", "h1", anti_affinity="g"), vm("n2", "h2", anti_affinity="g")]
    assert decide(view(hosts, vms)) == [PlaceVm("u-n1", "n1", "h3", "h1", 10, "failover")]


def test_non_ha_and_priority_none_and_local_disks_are_reported_not_moved():
    hosts = [dead("h1", fenced=True), host("h2", mem=8)]
    vms = [vm("plain", "h1", ha=False), vm("lab", "h1", priority=Priority.NONE),
           vm("local", "h1", on_shared_storage=False)]
    out = decide(view(hosts, vms))
    assert all(isinstance(d, MarkError) for d in out)
    assert [d.vm_name for d in out] == ["local", "plain", "lab"]


def test_same_error_is_not_repeated():
    hosts = [dead("h1", fenced=True), host("h2")]
    reported = vm("plain", "h1", ha=False, phase=VmPhase.ERROR, retryable_error=True,
                  error_reason="host h1 failed; VM is not HA, not moved")
    assert decide(view(hosts, [reported])) == []


def test_failover_limit_then_error():
    hosts = [dead("h1", fenced=True), host("h2")]
    tired = vm("a", "h1", failover_times=(10.0, 20.0, 30.0))
    (out,) = decide(view(hosts, [tired]))
    assert isinstance(out, MarkError) and "limit" in out.reason and not out.retryable


def test_crash_restarts_on_same_host_until_the_limit():
    crashed = vm("a", "h1", phase=VmPhase.CRASHED)
    assert decide(view([host("h1")], [crashed])) == [
        PlaceVm("u-a", "a", "h1", "h1", 10, "restart")]
    worn = vm("a", "h1", phase=VmPhase.CRASHED, restart_times=(1.0, 2.0, 3.0))
    assert isinstance(decide(view([host("h1")], [worn]))[0], MarkError)


def test_drain_stops_first_then_places_elsewhere():
    hosts = [host("h1", maintenance=True), host("h2")]
    assert decide(view(hosts, [vm("a", "h1")])) == [StopForDrain("u-a", "a", "h1", 10)]
    stopped = vm("a", "h1", owner_phase=OwnerPhase.STOP, phase=VmPhase.STOPPED)
    assert decide(view(hosts, [stopped])) == [PlaceVm("u-a", "a", "h2", "h1", 10, "drain")]


def test_live_drain_migrates_running_vms_then_quick_then_stop_and_start():
    from dataclasses import replace
    from parvisor.cluster.model import LiveMigrateVm
    hosts = [host("h1", maintenance=True), host("h2")]
    live = replace(view(hosts, [vm("a", "h1")]), policy=ClusterPolicy(live_drain=True))
    assert decide(live) == [LiveMigrateVm("u-a", "a", "h1", "h2", 10)]
    moving = replace(live, vms=(vm("a", "h1", migration="active"),))
    assert decide(moving) == []                       # wait for the migration's outcome
    failed = replace(live, vms=(vm("a", "h1", migration="failed"),))
    assert decide(failed) == [LiveMigrateVm("u-a", "a", "h1", "h2", 10, quick=True)]
    both = replace(live, vms=(vm("a", "h1", migration="failed-quick"),))
    assert decide(both) == [StopForDrain("u-a", "a", "h1", 10)]     # last resort
    paused = replace(live, vms=(vm("a", "h1", phase=VmPhase.PENDING),))
    assert decide(paused) == [StopForDrain("u-a", "a", "h1", 10)]
    nowhere = replace(live, hosts=(host("h1", maintenance=True),))
    assert decide(nowhere) == []                      # keeps running: the drain waits


def test_quarantine_after_three_dropouts_and_no_placement_there():
    hosts = [host("h1", dropout_times=(10.0, 40.0, 70.0))]
    assert decide(view(hosts, [])) == [QuarantineHost("h1", 100.0 + 7200.0, 3)]
    hosts = [dead("h0", fenced=True), host("h1", mem=8, quarantined_until=500.0), host("h2")]
    assert decide(view(hosts, [vm("a", "h0")]))[0].host == "h2"


def test_decisions_are_deterministic_under_input_order():
    hosts = [dead("h1", fenced=True), host("h2"), host("h3")]
    vms = [vm(f"v{i}", "h1") for i in range(6)]
    assert decide(view(hosts, vms)) == decide(view(hosts[::-1], vms[::-1]))


def test_decide_reads_no_clock():
    hosts = [dead("h1", seen_at=0.0), host("h2")]
    with no_wall_clock():
        assert decide(view(hosts, [vm("a", "h1")]))


@pytest.mark.parametrize("module", [decide_module, model, placement])
def test_pure_modules_import_no_clock_and_no_io(module):
    tree = ast.parse(inspect.getsource(module))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert not imported & {"time", "datetime", "random", "os", "socket", "subprocess"}
