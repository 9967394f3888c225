"""The real cluster environment: etcd for shared state, a ``LocalHost`` for this host's
QEMUs and watchdog. Implements ``parvisor.cluster.env.ClusterEnv``.

What for: the agent and manager (``agent.py``, ``manager.py``) run on this in
production. Every ownership change and status write is a transaction compared on the
owner key's mod revision (the fencing token); a failover additionally requires the old
owner's membership key to be absent (its lease expired). A failover to a replica moves
the owner, the replication record and the disk host in ONE transaction (both compares
hold, or nothing changes). ``read`` is one range over the cluster prefix, so a snapshot
is one etcd revision.

Never: decide anything, or retry a write after a timeout (it may have committed).
``parvisor.cluster.local_host`` is the ``LocalHost`` over the service's VmManager.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from parvisor.cluster.env import ClusterVm, HostRecord, Snapshot, VmStatus
from parvisor.cluster.etcd_kv import (EtcdKV, KeyValue, cmp_absent, cmp_mod, op_get,
                                      op_put, parse_kvs)
from parvisor.cluster.fencing import LocalVm
from parvisor.cluster.model import Owner, OwnerPhase, Priority, VmPhase
from parvisor.replication.protocol import ReplicationRecord
from parvisor.store.etcd import Keys


class LocalHost(Protocol):
    """This host's processes: QEMUs (by PID) and the watchdog client."""

    def local_vms(self) -> list[LocalVm]: ...
    def start_vm(self, vm: ClusterVm) -> None: ...
    def stop_vm(self, vm_uuid: str) -> None: ...
    def kill_vm(self, vm_uuid: str) -> None: ...
    def feed_watchdog(self, deadline: float, vm_uuids: list[str]) -> None: ...
    def save_lease(self, lease_id: int | None) -> None: ...
    def load_lease(self) -> int | None: ...
    def log(self, message: str) -> None: ...
    def note_vms(self, vms: dict[str, ClusterVm]) -> None: ...   # HA flags, per read


class EtcdEnv:
    def __init__(self, kv: EtcdKV, cluster: str, host: str, local: LocalHost,
                 shared_storage: Path | None = None) -> None:
        self.kv = kv
        self.shared_storage = shared_storage
        self.keys = Keys(f"/parvisor/{cluster}/")
        self.host = host
        self.local = local

    def now(self) -> float:
        return time.monotonic()     # never time.time(): INV-6

    def log(self, message: str) -> None:
        self.local.log(message)

    # --- etcd -----------------------------------------------------------------------
    def read(self) -> Snapshot:
        # Everything but the event log (it grows with every action, 4 reads a second
        # must not), in two ranges around it read at one revision: one consistent view.
        events = self.keys.under("event")
        items, revision = self.kv.range(self.keys.prefix, events)
        rest, _ = self.kv.range(events[:-1] + "0", _end_of(self.keys.prefix),
                                revision=revision)
        items += rest
        snapshot = parse_snapshot(self.keys, items, revision, self.shared_storage)
        note = getattr(self.local, "note_vms", None)   # optional: tests run no VMs
        if note is not None:
            note(snapshot.vms)
        return snapshot

    def lease_grant(self, ttl_s: float) -> int:
        return self.kv.grant(ttl_s)

    def lease_keepalive(self, lease_id: int) -> bool:
        return self.kv.keepalive(lease_id)

    def lease_revoke(self, lease_id: int) -> None:
        self.kv.revoke(lease_id)

    def register(self, lease_id: int, record: HostRecord) -> None:
        body = json.dumps(asdict(record), sort_keys=True)
        self.kv.txn([], [op_put(self.keys.host(self.host), body),
                         op_put(self.keys.member(self.host), body, lease=lease_id)])

    def campaign(self, lease_id: int) -> bool:
        key = self.keys.manager
        ok, _, responses = self.kv.txn([cmp_absent(key)],
                                       [op_put(key, self.host, lease=lease_id)],
                                       [op_get(key)])
        if ok:
            return True
        kvs = parse_kvs(responses[0]["response_range"].get("kvs", []))
        return bool(kvs) and kvs[0].value.decode() == self.host

    def change_owner(self, vm_uuid: str, expected_revision: int, host: str,
                     phase: OwnerPhase, require_absent: str | None) -> int | None:
        compare = [cmp_mod(self.keys.owner(vm_uuid), expected_revision)]
        if require_absent:
            compare.append(cmp_absent(self.keys.member(require_absent)))
        body = json.dumps({"host": host, "phase": phase.value})
        ok, revision, _ = self.kv.txn(compare, [op_put(self.keys.owner(vm_uuid), body)])
        return revision if ok else None

    def fail_over_to_replica(self, vm_uuid: str, expected_revision: int,
                             replication_revision: int, host: str,
                             record: ReplicationRecord, require_absent: str) -> int | None:
        """One txn: the owner and replication keys unchanged since read, the old
        primary's membership gone; then owner=<host> run, the record (its new
        generation) and diskhost=<host> (the VM now runs from that host's image)."""
        keys = self.keys
        compare = [cmp_mod(keys.owner(vm_uuid), expected_revision),
                   cmp_mod(keys.replication(vm_uuid), replication_revision),
                   cmp_absent(keys.member(require_absent))]
        owner = json.dumps({"host": host, "phase": OwnerPhase.RUN.value})
        ok, revision, _ = self.kv.txn(compare, [
            op_put(keys.owner(vm_uuid), owner),
            op_put(keys.replication(vm_uuid), record.to_json()),
            op_put(keys.disk_host(vm_uuid), host)])
        return revision if ok else None

    def write_replication(self, vm_uuid: str, expected_revision: int,
                          record: ReplicationRecord) -> bool:
        key = self.keys.replication(vm_uuid)
        ok, _, _ = self.kv.txn([cmp_mod(key, expected_revision)],
                               [op_put(key, record.to_json())])
        return ok

    def write_status(self, vm_uuid: str, status: VmStatus) -> bool:
        body = json.dumps({"phase": status.phase.value, "revision": status.revision,
                           "reason": status.reason, "retryable": status.retryable})
        ok, _, _ = self.kv.txn([cmp_mod(self.keys.owner(vm_uuid), status.revision)],
                               [op_put(self.keys.status(vm_uuid), body)])
        return ok

    def request_migration(self, vm_uuid: str, vm_name: str, source: str, destination: str,
                          owner_revision: int, quick: bool = False) -> bool:
        """A live migration request (drain): as ``vm migrate`` records it, conditioned
        on the owner token and on no other migration of the VM being in flight."""
        import time
        from parvisor.migration.protocol import MigrationOptions, MigrationRecord, Phase
        key = self.keys.migration(vm_uuid)
        current = self.kv.get(key)
        if current is not None and json.loads(current.value)["phase"] not in (
                "completed", "failed", "cancelled"):
            return False
        record = MigrationRecord(vm_uuid=vm_uuid, vm_name=vm_name, source=source,
                                 destination=destination, phase=Phase.REQUESTED,
                                 owner_revision=owner_revision, requested_at=time.time(),
                                 options=MigrationOptions(live=not quick))
        guard = cmp_absent(key) if current is None else cmp_mod(key, current.mod_revision)
        ok, _, _ = self.kv.txn([guard, cmp_mod(self.keys.owner(vm_uuid), owner_revision)],
                               [op_put(key, record.to_json())])
        return ok

    # --- this host (delegated) --------------------------------------------------------
    def local_vms(self) -> list[LocalVm]:
        return self.local.local_vms()

    def start_vm(self, vm: ClusterVm) -> None:
        self.local.start_vm(vm)

    def stop_vm(self, vm_uuid: str) -> None:
        self.local.stop_vm(vm_uuid)

    def kill_vm(self, vm_uuid: str) -> None:
        self.local.kill_vm(vm_uuid)

    def feed_watchdog(self, deadline: float, vm_uuids: list[str]) -> None:
        self.local.feed_watchdog(deadline, vm_uuids)

    def save_lease(self, lease_id: int | None) -> None:
        self.local.save_lease(lease_id)

    def load_lease(self) -> int | None:
        return self.local.load_lease()


def _end_of(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


def parse_snapshot(keys: Keys, items: list[KeyValue], revision: int,
                   shared_storage: Path | None = None) -> Snapshot:
    """Turn one prefix range into a Snapshot (unknown kinds are ignored)."""
    by_kind: dict[str, dict[str, KeyValue]] = {}
    for item in items:
        kind, _, name = item.key[len(keys.prefix):].partition("/")
        by_kind.setdefault(kind, {})[name] = item
    hosts = {name: HostRecord(**json.loads(kv.value))
             for name, kv in by_kind.get("hosts", {}).items()}
    owners = {}
    for uuid, kv in by_kind.get("owner", {}).items():
        doc = json.loads(kv.value)
        owners[uuid] = Owner(doc["host"], OwnerPhase(doc["phase"]), kv.mod_revision)
    statuses = {}
    for uuid, kv in by_kind.get("status", {}).items():
        doc = json.loads(kv.value)
        statuses[uuid] = VmStatus(VmPhase(doc["phase"]), doc["revision"], doc["reason"],
                                  doc["retryable"])
    disk_hosts = {uuid: kv.value.decode() for uuid, kv in by_kind.get("diskhost", {}).items()}
    vms = {uuid: _cluster_vm(uuid, kv, by_kind.get("hapolicy", {}).get(uuid), shared_storage,
                             disk_hosts.get(uuid))
           for uuid, kv in by_kind.get("vm", {}).items()}
    manager = by_kind.get("manager", {}).get("")
    migrations = {}
    for uuid, kv in by_kind.get("migration", {}).items():
        doc = json.loads(kv.value)
        migrations[uuid] = (doc["phase"], doc["source"],
                            doc.get("options", {}).get("live", True))
    replications = {uuid: ReplicationRecord.from_json(kv.value, kv.mod_revision)
                    for uuid, kv in by_kind.get("replication", {}).items()}
    return Snapshot(revision, hosts, frozenset(by_kind.get("members", {})),
                    frozenset(by_kind.get("maint", {})), vms, owners, statuses,
                    manager.value.decode() if manager else None, migrations, replications)


def _cluster_vm(uuid: str, kv: KeyValue, policy: KeyValue | None,
                shared_storage: Path | None = None,
                disk_host: str | None = None) -> ClusterVm:
    """The definition carries the HA policy (schema v5); an old ``hapolicy/`` key, if
    any, still wins for the fields it names. A ``diskhost/`` key says the disks are on
    that host's local storage, whatever this host's view of the shared path is."""
    doc = json.loads(kv.value)
    definition = doc["definition"]
    ha = json.loads(policy.value) if policy else {}
    preferred = ha.get("preferred_hosts", definition.get("preferred_hosts", ()))
    return ClusterVm(
        uuid=uuid, name=definition["name"], memory_bytes=definition["memory_bytes"],
        vcpus=definition["vcpus"], desired_running=doc.get("desired_state") == "running",
        ha=definition.get("ha", False),
        priority=Priority(ha.get("priority", definition.get("ha_priority", "medium"))),
        anti_affinity=ha.get("anti_affinity", definition.get("anti_affinity")),
        preferred_hosts=tuple(preferred),
        on_shared_storage=disk_host is None and ha.get(
            "on_shared_storage", disks_on(definition, shared_storage)),
        disk_host=disk_host)


def disks_on(definition: dict, shared_storage: Path | None) -> bool:
    """True when every disk file lies under the cluster storage path (unknown: True)."""
    if shared_storage is None:
        return True
    root = shared_storage.resolve()
    return all(Path(disk["path"]).resolve().is_relative_to(root)
               for disk in definition.get("disks", ()) if disk.get("path"))
