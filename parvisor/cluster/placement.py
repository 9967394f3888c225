"""Placement: which host a VM should run on. Pure; used only by ``decide``.

Order of preference: the VM's preferred hosts (in the order given), then the most free
memory, then the most free vCPUs, then the host name (so ties are deterministic).
Anti-affinity groups are hard: two running VMs of one group never share a host (guest
cluster nodes must survive a host loss). A VM whose disks are on one host's local
storage (``disk_host``) runs there only. Never reads a clock or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parvisor.cluster.model import ClusterView, HostView, VmView
from parvisor.replication.protocol import State as ReplicationState


@dataclass
class Usage:
    """Resources committed per host while one ``decide`` call places VMs in turn."""

    memory: dict[str, int] = field(default_factory=dict)
    vcpus: dict[str, int] = field(default_factory=dict)
    groups: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, view: ClusterView) -> "Usage":
        usage = cls()
        for vm in sorted(view.vms, key=lambda v: v.uuid):
            if vm.desired_running and vm.owner.host is not None:
                usage.add(vm, vm.owner.host)
        return usage

    def add(self, vm: VmView, host: str) -> None:
        self.memory[host] = self.memory.get(host, 0) + vm.memory_bytes
        self.vcpus[host] = self.vcpus.get(host, 0) + vm.vcpus
        if vm.anti_affinity:
            self.groups.setdefault(host, set()).add(vm.anti_affinity)

    def remove(self, vm: VmView, host: str) -> None:
        self.memory[host] = self.memory.get(host, 0) - vm.memory_bytes
        self.vcpus[host] = self.vcpus.get(host, 0) - vm.vcpus
        # groups: a VM leaving does not free its group slot within one decide call;
        # conservative, and the next tick recomputes from scratch.

    def free_memory(self, host: HostView) -> int:
        return host.memory_bytes - self.memory.get(host.name, 0)

    def free_vcpus(self, host: HostView) -> int:
        return host.cpus - self.vcpus.get(host.name, 0)


def refusal(host: HostView, vm: VmView, view: ClusterView, usage: Usage, *,
            disks_on_host: bool = False) -> str | None:
    """Why ``vm`` cannot go to ``host`` now, or None if it can. ``disks_on_host``:
    the host holds the VM's disks itself (its replica), so shared storage is moot."""
    if not host.member or host.fenced:
        return "not a member"
    if host.maintenance:
        return "in maintenance"
    if host.quarantined_until is not None and view.now < host.quarantined_until:
        return "quarantined"
    replica_set = vm.replication
    if replica_set is not None and replica_set.state != ReplicationState.DISABLED:
        if host.name == replica_set.primary:
            disks_on_host = True        # the newest generation's copy is local there
        elif not disks_on_host:
            # only the newest generation's primary may run it (a failover moves both)
            return f"not the primary of its replica set (generation {replica_set.generation})"
    if not disks_on_host and vm.on_shared_storage is False:
        if vm.disk_host is None:
            return "disks on local storage"
        if host.name != vm.disk_host:
            return f"disks on local storage of {vm.disk_host}"
        disks_on_host = True            # its own disks: shared storage is moot there
    if not disks_on_host and not host.shared_storage:
        return "no shared storage"
    if usage.free_memory(host) < vm.memory_bytes:
        return "not enough memory"
    if vm.anti_affinity and vm.anti_affinity in usage.groups.get(host.name, set()):
        return f"anti-affinity group {vm.anti_affinity}"
    return None


def choose_host(vm: VmView, view: ClusterView, usage: Usage,
                exclude: frozenset[str] = frozenset()) -> str | None:
    """The best host for ``vm``, or None when no host can take it."""
    candidates = [h for h in sorted(view.hosts, key=lambda h: h.name)
                  if h.name not in exclude and refusal(h, vm, view, usage) is None]
    if not candidates:
        return None

    def rank(host: HostView) -> tuple:
        preferred = (vm.preferred_hosts.index(host.name) if host.name in vm.preferred_hosts
                     else len(vm.preferred_hosts))
        return (preferred, -usage.free_memory(host), -usage.free_vcpus(host), host.name)

    return min(candidates, key=rank).name
