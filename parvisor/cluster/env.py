"""The environment interface: everything the agent and the manager do to the world.

What for: ``agent.py`` and ``manager.py`` run unchanged against two implementations:
``parvisor.testing.cluster_sim`` (virtual clock, fake etcd, fake hosts) and
``parvisor.cluster.etcd_env`` (real etcd + this host's QEMUs). One environment object
belongs to one host (the agent, and the manager while this host holds the manager key).

Never: decisions here. Implementations only read, write and report; every ownership or
status write is conditioned on the owner record's revision (the fencing token) and
reports rejection instead of overwriting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from parvisor.cluster.fencing import LocalVm
from parvisor.cluster.model import Owner, OwnerPhase, Priority, VmPhase
from parvisor.errors import StoreError
from parvisor.replication.protocol import ReplicationRecord


class ClusterUnavailable(StoreError):
    """etcd could not be reached or has no quorum; nothing was written."""

    code = "cluster_unavailable"
    http_status = 503


@dataclass(frozen=True)
class HostRecord:
    """A host's registration (its membership key holds this, attached to its lease)."""

    name: str
    memory_bytes: int
    cpus: int
    shared_storage: bool = True
    site: str = ""
    # what live migration checks before anything moves (parvisor.hypervisor.facts)
    migration: dict = field(default_factory=dict, compare=False, hash=False)
    # free bytes of its replica storage (None: not published; parvisor.replication)
    replica_free_bytes: int | None = None
    # the cluster API other members forward requests to ("" = none; parvisor.api.forward)
    api_url: str = ""


@dataclass(frozen=True)
class ClusterVm:
    """The cluster-relevant part of a VM definition + its HA policy."""

    uuid: str
    name: str
    memory_bytes: int
    vcpus: int
    desired_running: bool
    ha: bool = False
    priority: Priority = Priority.MEDIUM
    anti_affinity: str | None = None
    preferred_hosts: tuple[str, ...] = ()
    on_shared_storage: bool = True
    # the host whose local storage holds the disks (``diskhost/<uuid>``); None: shared
    disk_host: str | None = None


@dataclass(frozen=True)
class VmStatus:
    """What a VM's owner (or the manager, for errors) last reported, and for which
    owner revision; a status for an older revision is stale."""

    phase: VmPhase
    revision: int
    reason: str = ""
    retryable: bool = False


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of the cluster keys (one etcd revision)."""

    revision: int
    hosts: dict[str, HostRecord]              # every host that ever joined
    members: frozenset[str]                   # hosts whose membership key exists
    maintenance: frozenset[str]
    vms: dict[str, ClusterVm]
    owners: dict[str, Owner]
    statuses: dict[str, VmStatus] = field(default_factory=dict)
    manager: str | None = None
    # uuid -> (phase, source, live) of the VM's last migration record
    migrations: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    # uuid -> replication/<uuid> (its revision set from the key's mod revision)
    replications: dict[str, ReplicationRecord] = field(default_factory=dict)


class ClusterEnv(Protocol):
    host: str

    def now(self) -> float: ...                       # monotonic seconds
    def log(self, message: str) -> None: ...

    # --- etcd (raise ClusterUnavailable when unreachable / no quorum) ---------------
    def read(self) -> Snapshot: ...
    def lease_grant(self, ttl_s: float) -> int: ...
    def lease_keepalive(self, lease_id: int) -> bool: ...    # False: lease is gone
    def lease_revoke(self, lease_id: int) -> None: ...
    def register(self, lease_id: int, record: HostRecord) -> None: ...
    def campaign(self, lease_id: int) -> bool: ...           # True: this host manages
    def change_owner(self, vm_uuid: str, expected_revision: int, host: str,
                     phase: OwnerPhase, require_absent: str | None) -> int | None: ...
    def write_status(self, vm_uuid: str, status: VmStatus) -> bool: ...
    def request_migration(self, vm_uuid: str, vm_name: str, source: str, destination: str,
                          owner_revision: int, quick: bool = False) -> bool: ...  # False: changed
    # one txn: compare owner + replication revisions and require_absent's member key
    # absent; put owner=<host> run and ``record`` (its new generation). None: rejected
    def fail_over_to_replica(self, vm_uuid: str, expected_revision: int,
                             replication_revision: int, host: str,
                             record: ReplicationRecord,
                             require_absent: str) -> int | None: ...
    def write_replication(self, vm_uuid: str, expected_revision: int,
                          record: ReplicationRecord) -> bool: ...  # False: changed

    # --- this host ------------------------------------------------------------------
    def local_vms(self) -> list[LocalVm]: ...
    def start_vm(self, vm: ClusterVm) -> None: ...
    def stop_vm(self, vm_uuid: str) -> None: ...             # graceful, then kill
    def kill_vm(self, vm_uuid: str) -> None: ...             # SIGKILL by PID
    def feed_watchdog(self, deadline: float, vm_uuids: list[str]) -> None: ...
    def save_lease(self, lease_id: int | None) -> None: ...  # survives agent restart
    def load_lease(self) -> int | None: ...
