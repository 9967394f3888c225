"""Typed observed state of a failover cluster, and the decisions taken from it.

What for: the one vocabulary shared by the pure decision engine (``decide``), the
manager that applies decisions through an environment, the simulator and the etcd
environment. Everything here is a frozen value; nothing here does I/O or reads a clock.
Times are seconds on the *manager's monotonic clock* (INV-6), never wall-clock.

Glossary
--------
member        a host whose membership key (attached to its etcd lease) exists
lease lost    the membership key vanished: etcd expired or revoked the host's lease
grace         extra wait after a lease is seen lost, before the host counts as fenced
fenced        lease lost + grace over: the host has killed its HA VMs (deadline passed)
owner         the host a VM is assigned to; its record's etcd mod revision is the
              fencing token every ownership change and status write is conditioned on
phase         the owner record's instruction: ``run`` or ``stop`` (drain hand-off)
status        what the owner host last reported for the VM, tied to an owner revision
failover      a restart of an HA VM on another host after its owner was fenced
restart       a restart on the same (live) host after the VM's QEMU crashed
replica       a VM's disks copied to another host (``parvisor.replication``); its
              record's generation says which host may run the VM
quarantine    a host that lost its lease too often gets no new placements for a while
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from parvisor.replication.protocol import ReplicationRecord


class Priority(str, enum.Enum):
    """Hyper-V's failover priority; ``none`` is its "No Auto Start"."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    NONE = "none"

    @property
    def rank(self) -> int:
        return {"high": 0, "medium": 1, "low": 2, "none": 3}[self.value]


class OwnerPhase(str, enum.Enum):
    RUN = "run"
    STOP = "stop"


class VmPhase(str, enum.Enum):
    """What the cluster knows about a VM's process (from the owner's status record)."""

    PENDING = "pending"        # owner changed; the new owner has not reported yet
    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"
    ERROR = "error"            # the manager gave up (reason says why)


@dataclass(frozen=True)
class ClusterPolicy:
    """Timings and limits. Defaults are justified in docs/cluster.md."""

    lease_ttl_s: float = 8.0
    keepalive_interval_s: float = 1.0
    fence_margin_s: float = 2.5      # host kills HA VMs at last_sent + ttl - margin
    recovery_grace_s: float = 1.5    # manager waits this long after seeing a lease lost
    max_restarts: int = 3            # same-host restarts after crashes, per window
    max_failovers: int = 3           # moves to other hosts, per window (Hyper-V: n-1/6 h)
    limit_window_s: float = 3600.0
    quarantine_after: int = 3        # lease losses per window (Hyper-V 2016: 3 per hour)
    quarantine_s: float = 7200.0     # Hyper-V default quarantine: 2 hours
    # drain running VMs by live migration (the real cluster); False: stop, then start
    # elsewhere (the simulator, whose hosts run no QEMU to migrate)
    live_drain: bool = False


@dataclass(frozen=True)
class HostView:
    name: str
    member: bool                     # membership key present (lease alive in etcd)
    memory_bytes: int
    cpus: int
    shared_storage: bool = True      # sees the cluster storage path
    site: str = ""
    maintenance: bool = False
    lost_seen_at: float | None = None    # manager clock: first tick it saw no member key
    fenced: bool = False             # manager already acknowledged the fence
    quarantined_until: float | None = None
    dropout_times: tuple[float, ...] = ()    # manager clock: when leases were seen lost
    replica_free_bytes: int | None = None    # free replica storage it published


@dataclass(frozen=True)
class Owner:
    host: str | None
    phase: OwnerPhase = OwnerPhase.RUN
    revision: int = 0                # etcd mod revision: the fencing token


@dataclass(frozen=True)
class VmView:
    uuid: str
    name: str
    memory_bytes: int
    vcpus: int
    desired_running: bool
    owner: Owner
    phase: VmPhase
    ha: bool = False
    priority: Priority = Priority.MEDIUM
    anti_affinity: str | None = None
    preferred_hosts: tuple[str, ...] = ()
    on_shared_storage: bool = True   # False: disks on a host's local storage
    disk_host: str | None = None     # that host, when known (diskhost/<uuid>)
    error_reason: str = ""
    retryable_error: bool = False    # e.g. "no capacity": try again when it frees up
    restart_times: tuple[float, ...] = ()    # manager clock
    failover_times: tuple[float, ...] = ()   # manager clock
    # the VM's last migration: "" none, "active" in flight, "done", and from its current
    # owner "failed" (live, or cancelled) / "failed-quick"
    migration: str = ""
    replication: ReplicationRecord | None = None    # replication/<uuid>, if enabled


@dataclass(frozen=True)
class ClusterView:
    now: float                       # manager monotonic clock
    policy: ClusterPolicy
    hosts: tuple[HostView, ...]
    vms: tuple[VmView, ...]

    def host(self, name: str | None) -> HostView | None:
        return next((h for h in self.hosts if h.name == name), None)


# --- decisions ------------------------------------------------------------------------
@dataclass(frozen=True)
class AcknowledgeFence:
    host: str
    lost_seen_at: float

    def describe(self) -> str:
        return f"fence acknowledged: host {self.host} (lease lost, seen at {self.lost_seen_at:.2f}, grace over)"


@dataclass(frozen=True)
class QuarantineHost:
    host: str
    until: float
    dropouts: int

    def describe(self) -> str:
        return f"quarantine host {self.host} until {self.until:.0f} ({self.dropouts} lease losses in window)"


@dataclass(frozen=True)
class PlaceVm:
    """Write owner=<host>, phase run, conditioned on ``expected_revision``."""

    vm: str
    vm_name: str
    host: str
    from_host: str | None
    expected_revision: int
    reason: str                      # start | failover | restart | drain | retry

    def describe(self) -> str:
        source = f" from {self.from_host}" if self.from_host else ""
        return f"place {self.vm_name} on {self.host}{source} ({self.reason}, token r{self.expected_revision})"


@dataclass(frozen=True)
class StopForDrain:
    vm: str
    vm_name: str
    host: str
    expected_revision: int

    def describe(self) -> str:
        return f"stop {self.vm_name} on {self.host} for drain (token r{self.expected_revision})"


@dataclass(frozen=True)
class LiveMigrateVm:
    """Drain by live migration: record a migration request (the owner hosts carry it
    out through the migration protocol; the guest keeps running)."""

    vm: str
    vm_name: str
    source: str
    destination: str
    expected_revision: int
    quick: bool = False              # save -> move -> restore (after a live one failed)

    def describe(self) -> str:
        how = "quick-migrate" if self.quick else "live-migrate"
        return (f"{how} {self.vm_name} {self.source} -> {self.destination} for "
                f"drain (token r{self.expected_revision})")


@dataclass(frozen=True)
class FailoverToReplica:
    """The owner is fenced: restart the VM on its replica host from the replica image.
    One etcd transaction: compare owner/<uuid> mod revision == ``expected_revision``,
    replication/<uuid> mod revision == ``replication_revision`` and members/<from_host>
    absent; then put owner=<host> run and ``record`` (generation + 1). Either both
    change or neither: the old primary's copy is stale from that revision on."""

    vm: str
    vm_name: str
    host: str
    from_host: str
    expected_revision: int
    replication_revision: int
    record: ReplicationRecord        # what the transaction writes
    loss: str                        # the data-loss statement (none, window, forced)

    def describe(self) -> str:
        return (f"fail over {self.vm_name} to its replica on {self.host} from "
                f"{self.from_host} (generation {self.record.generation - 1} -> "
                f"{self.record.generation}; {self.loss}; txn: owner r{self.expected_revision}, "
                f"replication r{self.replication_revision}, {self.from_host} not a member)")


@dataclass(frozen=True)
class ReverseReplication:
    """Re-protect a failed-over VM: write ``record`` (state resyncing, the new
    replica) conditioned on replication/<uuid> mod revision == ``replication_revision``.
    The primary's service then copies every block again: into the old primary's
    images (its stale copy, which never starts), or into new images on another host."""

    vm: str
    vm_name: str
    replication_revision: int
    record: ReplicationRecord
    note: str = ""                   # e.g. the replica stays in the primary's site

    def describe(self) -> str:
        r = self.record
        how = "full copy" if r.full_resync else "copied again into its stale images"
        note = f"; {self.note}" if self.note else ""
        return (f"re-establish replication of {self.vm_name}: {r.primary} -> {r.replica} "
                f"({how}; generation {r.generation}, token r{self.replication_revision}"
                f"{note})")


@dataclass(frozen=True)
class MarkError:
    vm: str
    vm_name: str
    reason: str
    retryable: bool = False

    def describe(self) -> str:
        kind = "waiting" if self.retryable else "error"
        return f"{kind}: {self.vm_name}: {self.reason}"


Decision = (AcknowledgeFence | QuarantineHost | PlaceVm | StopForDrain | LiveMigrateVm
            | FailoverToReplica | ReverseReplication | MarkError)


@dataclass
class ManagerMemory:
    """What the manager remembers between ticks (lost on manager failover, which is
    safe: a new manager starts every grace period afresh)."""

    lost_seen_at: dict[str, float] = field(default_factory=dict)
    fenced: set[str] = field(default_factory=set)
    dropouts: dict[str, list[float]] = field(default_factory=dict)
    quarantined_until: dict[str, float] = field(default_factory=dict)
    restart_times: dict[str, list[float]] = field(default_factory=dict)
    failover_times: dict[str, list[float]] = field(default_factory=dict)
