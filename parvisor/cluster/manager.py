"""The cluster manager: observe, decide (pure), apply through the environment.

What for: runs inside the agent of whichever host holds the manager key. It turns a
``Snapshot`` plus its own memory (when it first saw each lease lost, fence
acknowledgements, restart/failover history) into a ``ClusterView``, calls ``decide``
and applies each decision with one conditioned write.

Never: decide anything itself (``decide.py`` does), read the wall clock, or write
without the owner revision it read (a stale manager's writes are rejected by etcd).
"""

from __future__ import annotations

from typing import Callable

from parvisor.cluster.decide import decide
from parvisor.cluster.env import ClusterEnv, ClusterUnavailable, Snapshot, VmStatus
from parvisor.cluster.model import (AcknowledgeFence, ClusterPolicy, ClusterView,
                                    Decision, FailoverToReplica, HostView, LiveMigrateVm,
                                    ManagerMemory, MarkError, Owner, OwnerPhase, PlaceVm,
                                    QuarantineHost, ReverseReplication, StopForDrain,
                                    VmPhase, VmView)

DecideFn = Callable[[ClusterView], list[Decision]]


class Manager:
    def __init__(self, env: ClusterEnv, policy: ClusterPolicy,
                 decide_fn: DecideFn = decide) -> None:
        self.env = env
        self.policy = policy
        self.memory = ManagerMemory()
        self._members_seen: set[str] = set()
        self._decide = decide_fn     # the simulator wraps it in a wall-clock guard
        self._owners: dict[str, Owner] = {}

    def tick(self, snapshot: Snapshot) -> list[Decision]:
        now = self.env.now()
        self._owners = snapshot.owners
        self._observe(snapshot, now)
        decisions = self._decide(build_view(snapshot, self.memory, now, self.policy))
        for decision in decisions:
            try:
                self._apply(decision, now)
            except ClusterUnavailable:
                self.env.log("manager: etcd unavailable; decisions of this tick dropped")
                break
        return decisions

    def _observe(self, snapshot: Snapshot, now: float) -> None:
        memory = self.memory
        for host in sorted(snapshot.hosts):
            if host in snapshot.members:
                memory.lost_seen_at.pop(host, None)
                memory.fenced.discard(host)
                self._members_seen.add(host)
                continue
            if host not in memory.lost_seen_at:
                memory.lost_seen_at[host] = now
                if host in self._members_seen:     # a drop-out we watched happen
                    memory.dropouts.setdefault(host, []).append(now)
                    what = "lost its lease"
                else:
                    what = "is not a member"
                self.env.log(f"{self.env.host} manager: host {host} {what}; grace "
                             f"{self.policy.recovery_grace_s:.1f} s")
            self._members_seen.discard(host)

    def _apply(self, decision: Decision, now: float) -> None:
        if isinstance(decision, AcknowledgeFence):
            self.memory.fenced.add(decision.host)
        elif isinstance(decision, QuarantineHost):
            self.memory.quarantined_until[decision.host] = decision.until
        elif isinstance(decision, PlaceVm):
            if not self._place(decision, now):
                return
        elif isinstance(decision, StopForDrain):
            if self.env.change_owner(decision.vm, decision.expected_revision,
                                     decision.host, OwnerPhase.STOP, None) is None:
                self.env.log(f"{self.env.host} manager: rejected (stale token): {decision.describe()}")
                return
        elif isinstance(decision, LiveMigrateVm):
            if not self.env.request_migration(decision.vm, decision.vm_name, decision.source,
                                              decision.destination, decision.expected_revision,
                                              quick=decision.quick):
                self.env.log(f"{self.env.host} manager: not requested (changed meanwhile): "
                             f"{decision.describe()}")
                return
        elif isinstance(decision, (FailoverToReplica, ReverseReplication)):
            if not self._replication(decision, now):
                return
        elif isinstance(decision, MarkError):
            status = VmStatus(VmPhase.ERROR, self._owner_revision(decision.vm),
                              decision.reason, decision.retryable)
            self.env.write_status(decision.vm, status)
        self.env.log(f"{self.env.host} manager: {decision.describe()}")

    def _place(self, decision: PlaceVm, now: float) -> bool:
        require_absent = decision.from_host if decision.reason == "failover" else None
        new_revision = self.env.change_owner(decision.vm, decision.expected_revision,
                                             decision.host, OwnerPhase.RUN, require_absent)
        if new_revision is None:
            self.env.log(f"{self.env.host} manager: rejected (stale token): {decision.describe()}")
            return False
        history = {"failover": self.memory.failover_times,
                   "restart": self.memory.restart_times}.get(decision.reason)
        if history is not None:
            history.setdefault(decision.vm, []).append(now)
        return True

    def _replication(self, decision: FailoverToReplica | ReverseReplication,
                     now: float) -> bool:
        if isinstance(decision, ReverseReplication):
            done = self.env.write_replication(decision.vm, decision.replication_revision,
                                              decision.record)
        else:
            done = self.env.fail_over_to_replica(
                decision.vm, decision.expected_revision, decision.replication_revision,
                decision.host, decision.record, decision.from_host) is not None
            if done:
                self.memory.failover_times.setdefault(decision.vm, []).append(now)
        if not done:
            self.env.log(f"{self.env.host} manager: rejected (stale token): {decision.describe()}")
        return done

    def _owner_revision(self, vm_uuid: str) -> int:
        return self._owners.get(vm_uuid, Owner(None)).revision


def build_view(snapshot: Snapshot, memory: ManagerMemory, now: float,
               policy: ClusterPolicy) -> ClusterView:
    hosts = tuple(_host_view(snapshot, memory, name) for name in sorted(snapshot.hosts))
    vms = tuple(_vm_view(snapshot, memory, uuid) for uuid in sorted(snapshot.vms))
    return ClusterView(now, policy, hosts, vms)


def _host_view(snapshot: Snapshot, memory: ManagerMemory, name: str) -> HostView:
    record = snapshot.hosts[name]
    return HostView(
        name=name, member=name in snapshot.members, memory_bytes=record.memory_bytes,
        cpus=record.cpus, shared_storage=record.shared_storage, site=record.site,
        maintenance=name in snapshot.maintenance,
        lost_seen_at=memory.lost_seen_at.get(name), fenced=name in memory.fenced,
        quarantined_until=memory.quarantined_until.get(name),
        dropout_times=tuple(memory.dropouts.get(name, ())),
        replica_free_bytes=record.replica_free_bytes)


def _vm_view(snapshot: Snapshot, memory: ManagerMemory, uuid: str) -> VmView:
    vm = snapshot.vms[uuid]
    owner = snapshot.owners.get(uuid, Owner(None))
    status = snapshot.statuses.get(uuid)
    phase, reason, retryable = VmPhase.PENDING, "", False
    if status is not None and status.revision == owner.revision:
        phase, reason, retryable = status.phase, status.reason, status.retryable
    elif owner.host is None:
        phase = VmPhase.STOPPED
    return VmView(
        uuid=uuid, name=vm.name, memory_bytes=vm.memory_bytes, vcpus=vm.vcpus,
        desired_running=vm.desired_running, owner=owner, phase=phase, ha=vm.ha,
        priority=vm.priority, anti_affinity=vm.anti_affinity,
        preferred_hosts=vm.preferred_hosts, on_shared_storage=vm.on_shared_storage,
        disk_host=vm.disk_host, error_reason=reason, retryable_error=retryable,
        restart_times=tuple(memory.restart_times.get(uuid, ())),
        failover_times=tuple(memory.failover_times.get(uuid, ())),
        migration=_migration_state(snapshot.migrations.get(uuid), owner),
        replication=snapshot.replications.get(uuid))


def _migration_state(brief: tuple[str, str, bool] | None, owner: Owner) -> str:
    """(phase, source, live) of the VM's last migration record -> VmView.migration."""
    if brief is None:
        return ""
    phase, source, live = brief
    if phase in ("failed", "cancelled"):
        if source != owner.host:
            return ""
        return "failed" if live else "failed-quick"
    return "done" if phase == "completed" else "active"
