"""The failover cluster's decision engine: observed state in, decisions out.

What for: every choice the cluster manager makes (fence acknowledgement, failover,
restart after a crash, drain hand-off, quarantine, giving up with a reason) is taken
here, as a pure function of a ``ClusterView``. The same function runs in production
(``parvisor.cluster.manager`` over etcd), in the simulator and in the scenario tests;
only the environment that applies the decisions changes (pve-ha-manager's shape).

Never: I/O, reading a clock (``view.now`` is the manager's monotonic time, INV-6),
randomness, or iteration over unordered collections (sorted everywhere, so golden logs
are stable).

Safety rule encoded here: a VM owned by a host that lost its lease is moved only once
that host is *fenced*: its lease was seen lost and a grace period passed since. The
host itself killed its HA VMs before its lease could expire (``fencing.py``); the
ownership write is further conditioned on the owner revision (fencing token).

Replicated VMs (``parvisor.replication``): a fenced owner's VM restarts on its replica
host only, from the replica image, when ``failover_verdict`` allows it (sync in-sync: no
loss; async: back to the last consistent point, reported; broken: only when the user
forced it); the same transaction bumps the replica set's generation. A failed-over VM
is re-protected as soon as a host can hold its replica, its old primary first.
"""

from __future__ import annotations

from dataclasses import replace

from parvisor.cluster.model import (AcknowledgeFence, ClusterView, Decision,
                                    FailoverToReplica, HostView, LiveMigrateVm, MarkError,
                                    OwnerPhase, PlaceVm, Priority, QuarantineHost,
                                    ReverseReplication, StopForDrain, VmPhase, VmView)
from parvisor.cluster.placement import Usage, choose_host, refusal
from parvisor.replication.placement import (NoReplicaHost, ReplicaCandidate,
                                            choose_replica)
from parvisor.replication.placement import refusal as replica_refusal
from parvisor.replication.protocol import ReplicationRecord, State, failover_verdict


def decide(view: ClusterView) -> list[Decision]:
    """All decisions for this tick, hosts first, then VMs by priority and name."""
    decisions: list[Decision] = []
    decisions += _host_decisions(view)
    fenced = {h.name for h in view.hosts if h.fenced}
    fenced |= {d.host for d in decisions if isinstance(d, AcknowledgeFence)}
    usage = Usage.of(view)
    for vm in sorted(view.vms, key=lambda v: (v.priority.rank, v.name, v.uuid)):
        decision = _decide_vm(vm, view, frozenset(fenced), usage)
        if decision is None:
            continue
        decisions.append(decision)
        if (isinstance(decision, (PlaceVm, FailoverToReplica))
                and decision.host != decision.from_host):
            usage.add(vm, decision.host)
            if decision.from_host:
                usage.remove(vm, decision.from_host)
    return decisions


def _host_decisions(view: ClusterView) -> list[Decision]:
    out: list[Decision] = []
    policy = view.policy
    for host in sorted(view.hosts, key=lambda h: h.name):
        if (not host.member and not host.fenced and host.lost_seen_at is not None
                and view.now >= host.lost_seen_at + policy.recovery_grace_s):
            out.append(AcknowledgeFence(host.name, host.lost_seen_at))
        recent = [t for t in host.dropout_times if view.now - t <= policy.limit_window_s]
        if len(recent) >= policy.quarantine_after and host.quarantined_until is None:
            out.append(QuarantineHost(host.name, view.now + policy.quarantine_s,
                                      len(recent)))
    return out


def _decide_vm(vm: VmView, view: ClusterView, fenced: frozenset[str],
               usage: Usage) -> Decision | None:
    if not vm.desired_running:
        return None     # stopping is the owner's job; nothing to recover
    if vm.owner.host is None:
        return _place(vm, view, usage, reason="start")
    if vm.owner.host in fenced:
        return _recover(vm, view, usage)
    owner = view.host(vm.owner.host)
    if owner is None or not owner.member:
        return None     # lease lost but not fenced yet: wait (never act early)
    if vm.phase == VmPhase.ERROR and vm.retryable_error:
        return _retry(vm, view, usage)
    if vm.phase == VmPhase.CRASHED:
        return _restart(vm, view)
    if owner.maintenance:
        return _drain(vm, view, usage)
    if vm.replication is not None:
        return _reprotect(vm, vm.replication, view)
    return None


def _place(vm: VmView, view: ClusterView, usage: Usage, *, reason: str,
           exclude: frozenset[str] = frozenset()) -> Decision | None:
    host = choose_host(vm, view, usage, exclude)
    if host is None and vm.disk_host is not None and not vm.on_shared_storage:
        return _error(vm, f"{reason}: {_disk_host_refusal(vm, view, usage, exclude)}",
                      retryable=True)
    if host is None:
        return _error(vm, f"{reason}: no host can take it (memory, storage, "
                          "anti-affinity, maintenance)", retryable=True)
    return PlaceVm(vm.uuid, vm.name, host, vm.owner.host, vm.owner.revision, reason)


def _disk_host_refusal(vm: VmView, view: ClusterView, usage: Usage,
                       exclude: frozenset[str]) -> str:
    """Why a VM on one host's local storage cannot start: that host's refusal."""
    where = f"disks on local storage of {vm.disk_host}"
    host = view.host(vm.disk_host)
    if host is None:
        return f"{where}, which is not a cluster host"
    if host.name in exclude:
        return f"{where}: it cannot move to another host"
    return f"{where}: {refusal(host, vm, view, usage) or 'refused'}"


def _recover(vm: VmView, view: ClusterView, usage: Usage) -> Decision | None:
    """The owner is fenced: restart HA VMs elsewhere, report the others."""
    lost = vm.owner.host
    # These three wait for their own host to come back (retryable, see _retry).
    if not vm.ha:
        return _error(vm, f"host {lost} failed; VM is not HA, not moved", retryable=True)
    if vm.priority == Priority.NONE:
        return _error(vm, f"host {lost} failed; priority none: no automatic restart",
                      retryable=True)
    replica = _replication(vm)
    if replica is None and not vm.on_shared_storage:
        return _error(vm, f"host {lost} failed; disks on local storage: not protected",
                      retryable=True)
    recent = _recent(vm.failover_times, view)
    if recent >= view.policy.max_failovers:
        return _error(vm, f"failed over {recent} times within "
                          f"{view.policy.limit_window_s:.0f} s: limit reached")
    if replica is not None:
        return _to_replica(vm, replica, view, usage, lost or "")
    return _place(vm, view, usage, reason="failover", exclude=frozenset({lost or ""}))


def _replication(vm: VmView) -> ReplicationRecord | None:
    record = vm.replication
    return None if record is None or record.state == State.DISABLED else record


def _to_replica(vm: VmView, record: ReplicationRecord, view: ClusterView, usage: Usage,
                lost: str) -> Decision | None:
    """Restart on the replica host from its image, if its copy allows it (these
    errors wait: for the host, a resync or the user's --force)."""
    if record.primary != lost:      # owner and record move in one txn: never expected
        return _error(vm, f"host {lost} failed; replication names {record.primary} as "
                          f"primary (generation {record.generation}): not moved",
                      retryable=True)
    verdict = failover_verdict(record)
    if not verdict.allowed:
        return _error(vm, f"host {lost} failed; {verdict.reason}", retryable=True)
    target = view.host(record.replica)
    why = (refusal(target, vm, view, usage, disks_on_host=True) if target is not None
           else "not a cluster host")
    if why is not None:
        return _error(vm, f"host {lost} failed; replica host {record.replica}: {why}",
                      retryable=True)
    return FailoverToReplica(vm.uuid, vm.name, record.replica, lost, vm.owner.revision,
                             record.revision,
                             record.failed_over(f"failover from {lost}: {verdict.reason}"),
                             verdict.reason)


def _reprotect(vm: VmView, record: ReplicationRecord,
               view: ClusterView) -> Decision | None:
    """A failed-over VM runs alone: resync to its old primary once it is back (only
    changed blocks travel), else to any host that can hold a replica; none: wait."""
    if (record.state != State.FAILED_OVER or record.primary != vm.owner.host
            or vm.phase != VmPhase.RUNNING):
        return None
    candidates = [_replica_candidate(h, view) for h in sorted(view.hosts,
                                                              key=lambda h: h.name)]
    old = next((c for c in candidates if c.name == record.replica), None)
    if old is not None:     # its stale copy is the base: room is not in question
        base = replace(old, free_bytes=max(old.free_bytes or 0, record.disk_bytes))
        if replica_refusal(base, record.primary, record.disk_bytes) is None:
            return ReverseReplication(vm.uuid, vm.name, record.revision,
                                      record.reversed_to(old.name, incremental=True))
    try:
        choice = choose_replica(record.primary, record.disk_bytes,
                                [c for c in candidates if c.name != record.replica])
    except NoReplicaHost:
        return None         # runs unprotected meanwhile (the record says failed-over)
    return ReverseReplication(vm.uuid, vm.name, record.revision,
                              record.reversed_to(choice.host, incremental=False),
                              choice.note)


def _replica_candidate(host: HostView, view: ClusterView) -> ReplicaCandidate:
    quarantined = host.quarantined_until is not None and view.now < host.quarantined_until
    return ReplicaCandidate(host.name, host.member and not host.fenced, host.site,
                            host.replica_free_bytes, host.maintenance, quarantined)


def _retry(vm: VmView, view: ClusterView, usage: Usage) -> Decision | None:
    """A VM waiting with a retryable error whose owner is a live member again."""
    host = vm.owner.host or ""
    if (not vm.ha or vm.priority == Priority.NONE or not vm.on_shared_storage
            or _replication(vm) is not None):
        # its disks (or its newest generation's copy) are on that host
        return PlaceVm(vm.uuid, vm.name, host, host, vm.owner.revision, "host back")
    return _place(vm, view, usage, reason="retry")


def _restart(vm: VmView, view: ClusterView) -> Decision | None:
    recent = _recent(vm.restart_times, view)
    if recent >= view.policy.max_restarts:
        return _error(vm, f"crashed {recent} times within "
                          f"{view.policy.limit_window_s:.0f} s: restart limit reached")
    host = vm.owner.host or ""
    return PlaceVm(vm.uuid, vm.name, host, host, vm.owner.revision, "restart")


def _drain(vm: VmView, view: ClusterView, usage: Usage) -> Decision | None:
    """Maintenance: live-migrate running VMs (``policy.live_drain``), quick-migrate a VM
    whose live migration failed; when both failed, or it is not running, or live drain
    is off: stop it on the source, then start it elsewhere."""
    source = vm.owner.host or ""
    if vm.owner.phase == OwnerPhase.RUN:
        if vm.migration == "active":
            return None     # a live migration is moving it: wait for its outcome
        destination = choose_host(vm, view, usage, frozenset({source}))
        if destination is None:
            return None     # nowhere to go: keep it running, the drain waits
        if (view.policy.live_drain and vm.phase == VmPhase.RUNNING
                and vm.migration != "failed-quick"):
            # live first; after a failed live migration, quick (save, move, restore)
            return LiveMigrateVm(vm.uuid, vm.name, source, destination, vm.owner.revision,
                                 quick=vm.migration == "failed")
        return StopForDrain(vm.uuid, vm.name, source, vm.owner.revision)
    if vm.phase in (VmPhase.STOPPED, VmPhase.ERROR):
        return _place(vm, view, usage, reason="drain", exclude=frozenset({source}))
    return None         # the source has not confirmed the stop yet


def _error(vm: VmView, reason: str, *, retryable: bool = False) -> MarkError | None:
    """A MarkError unless the VM already carries exactly this error (no log spam)."""
    if (vm.phase == VmPhase.ERROR and vm.error_reason == reason
            and vm.retryable_error == retryable):
        return None
    return MarkError(vm.uuid, vm.name, reason, retryable)


def _recent(times: tuple[float, ...], view: ClusterView) -> int:
    return sum(1 for t in times if view.now - t <= view.policy.limit_window_s)
