"""VM actions on a cluster member: the cluster decides where a VM runs.

What for: on a standalone host ``vm start`` launches QEMU right here. In a cluster the
request only records the wish (desired state ``running``) and the cluster manager
places the VM (preferred hosts, free memory, anti-affinity); the owner's agent then
starts it through ``start_here``. Stop requests for a VM running on another host are
recorded the same way and carried out by its owner. ``vm list``/``vm show`` on any host
report the owner host and the HA protection from the owner, status and replication
keys. A VM whose disks are on this host's local storage gets ``diskhost/<uuid>`` = this
host when it is created, imported, cloned or given such a disk (every one of those ends
in a ``created``/``edited``/``hot-plug`` event, the one place they all pass); the
manager places it there only. A failed-over VM starts from its replica images.

Never: launch a VM that has no owner record naming this host (only the agent calls
``start_here``); clear an owner record while that owner is not a live member (its VM
may still be running there, INV-1).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import cmp_absent, cmp_mod, op_delete, op_put
from parvisor.cluster.local_host import reset_for_takeover
from parvisor.cluster.migration_host import MigrationHostActions
from parvisor.errors import Busy, Refused
from parvisor.model.states import VmState
from parvisor.model.vm import VmStatus
from parvisor.ops.vms import VmManager
from parvisor.replication.protocol import Mode, ReplicationRecord, State, protection
from parvisor.store.base import VmRecord
from parvisor.vm.paths import VmPaths

log = logging.getLogger("parvisor.cluster")

DRAIN_SHUTDOWN_TIMEOUT_S = 30.0
SAVED_STATES_DIR = "saved-states"      # under the shared storage path
# events after which a VM's disks may have become local (see the module docstring)
DISK_EVENTS = frozenset({"created", "edited", "hot-plug"})


class OwnedElsewhere(Refused):
    """The VM belongs to another host that may still run it: nothing is changed here."""

    code = "wrong_host"
    http_status = 409


class ClusterVmManager(MigrationHostActions, VmManager):
    shared_storage: Path | None = None      # set by the cluster runtime
    migrations: Any = None                  # MigrationCoordinator, set by the runtime
    replication: Any = None                 # ReplicationCoordinator, set by the runtime

    def paths(self, vm_uuid: str) -> VmPaths:
        """Saved states live on the cluster's shared storage: any host restores them
        (a VM saved on h1 may start on h2; quick migration relies on it)."""
        saved = self.shared_storage / SAVED_STATES_DIR if self.shared_storage else None
        return VmPaths(self.config.state_dir, vm_uuid, saved)

    def _launch_spec(self, definition: Any, **extra: Any) -> Any:
        """Every QEMU in the cluster runs the cluster's CPU baseline when one is set
        (processor compatibility: VMs can then move between hosts with other CPUs)."""
        extra.setdefault("cpu_baseline", self.cpu_baseline())
        return super()._launch_spec(definition, **extra)

    def cpu_baseline(self) -> str | None:
        item = self.store.kv.get(self.store.keys.cpu_baseline)
        return item.value.decode() if item is not None and item.value else None

    # --- reading --------------------------------------------------------------------
    def _cluster_doc(self, kind: str, vm_uuid: str) -> tuple[dict | None, int]:
        item = self.store.kv.get(f"{self.store.keys.prefix}{kind}/{vm_uuid}")
        return (json.loads(item.value), item.mod_revision) if item else (None, 0)

    def hosts_of_vms(self, records: list[VmRecord]) -> dict[str, str]:
        prefix = f"{self.store.keys.prefix}owner/"
        try:
            items, _ = self.store.kv.get_prefix(prefix)
        except ClusterUnavailable:
            return {}          # the page shows "-" until etcd answers again
        return {item.key[len(prefix):]: json.loads(item.value)["host"] for item in items}

    def status(self, record: VmRecord) -> VmStatus:
        base = super().status(record)
        owner, revision = self._cluster_doc("owner", record.uuid)
        status, _ = self._cluster_doc("status", record.uuid)
        current = status if status and owner and status["revision"] == revision else None
        replication = self.replication_record(record.uuid)
        return base.model_copy(update={
            "host": owner["host"] if owner else "-",
            "ha_status": self._ha_status(record, current, replication),
            "migration": self._migration_line(record),
            "replication": replication_line(replication)})

    def replication_record(self, vm_uuid: str) -> ReplicationRecord | None:
        item = self.store.kv.get(self.store.keys.replication(vm_uuid))
        return ReplicationRecord.from_json(item.value, item.mod_revision) if item else None

    def disk_host(self, vm_uuid: str) -> str | None:
        item = self.store.kv.get(self.store.keys.disk_host(vm_uuid))
        return item.value.decode() if item else None

    def _migration_line(self, record: VmRecord) -> str:
        migration = self.migrations.read(record.uuid) if self.migrations else None
        if migration is None or migration.terminal:
            return ""
        line = f"{migration.source} -> {migration.destination}, {migration.phase}"
        left = migration.progress.get("ram_remaining")
        return line + (f" ({left >> 20} MiB of RAM left)" if left else "")

    def _ha_status(self, record: VmRecord, status: dict | None,
                   replication: ReplicationRecord | None = None) -> str:
        if status and status["phase"] == "error":
            return f"{'waiting' if status['retryable'] else 'error'}: {status['reason']}"
        shared = self.on_shared_storage(record) and self.disk_host(record.uuid) is None
        return protection(record.definition.ha, shared, replication)

    def on_shared_storage(self, record: VmRecord) -> bool:
        if self.shared_storage is None:
            return True
        root = self.shared_storage.resolve()
        return all(Path(disk.path).resolve().is_relative_to(root)
                   for disk in record.definition.disks if disk.path)

    def local_disks(self, definition: Any) -> list[Path]:
        return local_disk_paths(definition, self.shared_storage)

    # --- where the disks are ---------------------------------------------------------
    def event(self, kind: str, message: str, record: VmRecord | None = None,
              **details: Any) -> None:
        super().event(kind, message, record, **details)
        if kind in DISK_EVENTS and record is not None:
            self._note_disk_host(record)

    def _note_disk_host(self, record: VmRecord) -> None:
        """Local disks made here: the VM runs here only (diskhost = this host). Never
        overwritten: a VM already local to another host stays there (a with-storage
        migration or a failover moves the key, in their own transactions)."""
        local = self.local_disks(record.definition)
        if not local or not all(path.exists() for path in local):
            return      # shared only, or edited from another host: not ours to claim
        key = self.store.keys.disk_host(record.uuid)
        try:
            self.store.kv.txn([cmp_absent(key)], [op_put(key, self.config.host_name)])
        except ClusterUnavailable as exc:
            # the VM write just went through etcd; if this one did not, say so loudly:
            # without the key the manager refuses to place the VM anywhere
            log.warning("disk host of %s not recorded: %s", record.name, exc.message)

    # --- requests from users (any host) ----------------------------------------------
    async def start(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        runtime = self.runtimes.get(record.uuid)
        if runtime is not None and runtime.process is not None:
            return {"vm": self.show(name).model_dump(mode="json"), "warning": None}
        self._release_stopped_owner(record)
        self.store.set_state(record.uuid, record.state, record.state_reason,
                             desired_state="running")
        self.event("cluster", f"{name}: start requested; the cluster manager places it",
                   record)
        return {"vm": self.show(name).model_dump(mode="json"),
                "warning": "placed by the cluster manager: see vm show for its host"}

    def _release_stopped_owner(self, record: VmRecord) -> None:
        """A VM stopped on its owner keeps that owner record; clear it (conditioned on
        its revision) so the manager places the VM afresh."""
        owner, revision = self._cluster_doc("owner", record.uuid)
        if owner is None:
            return
        keys = self.store.keys
        if self.store.kv.get(keys.member(owner["host"])) is None:
            raise OwnedElsewhere(f"VM '{record.name}' belongs to host {owner['host']}, which "
                                 "is not a cluster member now; it may still run there",
                                 vm=record.name, host=owner["host"])
        status, _ = self._cluster_doc("status", record.uuid)
        if status and status["revision"] == revision and status["phase"] == "running":
            raise OwnedElsewhere(f"VM '{record.name}' is running on host {owner['host']}",
                                 vm=record.name, host=owner["host"])
        self.store.kv.txn([cmp_mod(keys.owner(record.uuid), revision)],
                          [op_delete(keys.owner(record.uuid)),
                           op_delete(keys.status(record.uuid))])

    async def shutdown(self, name: str, timeout_s: float | None = None) -> dict[str, Any]:
        if self._here(name):
            self._want_off(name)
            return await super().shutdown(name, timeout_s)
        return self._request_stop(name)

    async def turn_off(self, name: str) -> dict[str, Any]:
        if self._here(name):
            self._want_off(name)
            return await super().turn_off(name)
        return self._request_stop(name)

    async def delete(self, name: str, force: bool = False) -> dict[str, Any]:
        record = self.store.get_vm(name)
        migration = self.migrations.read(record.uuid) if self.migrations else None
        if migration is not None and not migration.terminal:
            raise Busy(f"VM '{name}' is migrating ({migration.source} -> "
                       f"{migration.destination}, {migration.phase}); cancel it first",
                       vm=name)
        replication = self.replication_record(record.uuid)
        if replication is not None:
            # its replica (images, NBD daemons on another host) would be left behind
            raise Busy(f"VM '{name}' is replicated to {replication.replica} "
                       f"({replication.state.value}); disable it first: parvisor vm "
                       f"replication disable {name}", vm=name)
        result = await super().delete(name, force)
        self.store.kv.txn([], [op_delete(self.store.keys.disk_host(record.uuid))])
        saved = self.paths(record.uuid).saved_state     # on shared storage: not in root
        saved.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            saved.parent.rmdir()
        return result

    def _want_off(self, name: str) -> None:
        """Record the wish first: while QEMU goes down, this host's agent must see a VM
        meant to be off, not a crash that the manager restarts (it did, before)."""
        record = self.store.get_vm(name)
        if record.state in (VmState.RUNNING, VmState.PAUSED):
            self.store.set_state(record.uuid, record.state, record.state_reason,
                                 desired_state="off")

    def _here(self, name: str) -> bool:
        runtime = self.runtimes.get(self.store.get_vm(name).uuid)
        return runtime is not None and runtime.process is not None

    def _request_stop(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        self.store.set_state(record.uuid, record.state, record.state_reason,
                             desired_state="off")
        self.event("cluster", f"{name}: stop requested; its owner host stops it", record)
        return {"vm": self.show(name).model_dump(mode="json"),
                "result": "stop requested: the owner host shuts it down"}

    # --- called by this host's agent ------------------------------------------------
    async def start_here(self, vm_uuid: str) -> None:
        reset_for_takeover(self.store, vm_uuid, self.config.host_name)
        if self.replication is not None:
            # a replica target of this VM here must let go of the images first
            await self.replication.before_start(vm_uuid)
        record = self._on_replica_images(self.store.get_vm_by_uuid(vm_uuid))
        await super().start(record.name)

    def _on_replica_images(self, record: VmRecord) -> VmRecord:
        """A VM failed over to this host runs from this host's replica images: point
        its disks there (conditioned on the generation just read) before QEMU opens
        them. Nothing to do without replication, or when the paths already match."""
        replication = self.replication_record(record.uuid)
        if (replication is None or replication.state == State.DISABLED
                or replication.primary != self.config.host_name):
            return record
        moved = replica_paths(record.definition, replication.images.get(
            self.config.host_name, {}))
        if not moved:
            return record
        updated = self.store.update_definition(on_images(record.definition, moved),
                                               record.generation)
        self.event("replication", f"{record.name}: runs from its replica images on "
                   f"{self.config.host_name} (generation {replication.generation})",
                   updated, disks=moved)
        return updated

    async def stop_here(self, vm_uuid: str) -> None:
        """Owner phase ``stop`` (drain) or desired state off: shut down gracefully. A
        drain keeps the desired state ``running`` so the manager starts it elsewhere."""
        runtime = self.runtimes.get(vm_uuid)
        if runtime is None or runtime.process is None or runtime.lock.locked():
            return      # gone already, or a stop/start is in progress
        record = self.store.get_vm_by_uuid(vm_uuid)
        await super().shutdown(record.name, DRAIN_SHUTDOWN_TIMEOUT_S)
        if record.desired_state == "running":
            self.store.set_state(vm_uuid, VmState.OFF, "stopped for drain",
                                 desired_state="running")

    async def forget_killed(self, vm_uuid: str) -> None:
        """After a fence kill: drop the dead process once it is gone."""
        runtime = self.runtimes.get(vm_uuid)
        if runtime is None or runtime.process is None:
            return
        process = runtime.process
        await process.wait_exited()
        if runtime.process is process:
            runtime.cancel_watchers()
            runtime.process = None
            runtime.reset_guest_facts()


def replica_paths(definition: Any, images: dict[str, str]) -> dict[str, str]:
    """disk id -> this host's replica image, for the disks whose path differs."""
    return {disk.id: images[disk.id] for disk in definition.disks
            if disk.id in images and disk.path != images[disk.id]}


def on_images(definition: Any, paths: dict[str, str]) -> Any:
    """The definition with those disks on those images: parvisor made them (owned: they
    go with the VM); the replica engine writes qcow2 (``replication.paths``)."""
    disks = tuple(
        disk.model_copy(update={"path": paths[disk.id], "owned": True, **(
            {"format": "qcow2"} if paths[disk.id].endswith(".qcow2") else {})})
        if disk.id in paths else disk for disk in definition.disks)
    return definition.model_copy(update={"disks": disks})


def replication_line(record: ReplicationRecord | None) -> str:
    """``vm show``'s replication line: where to, how, in which state ("" without)."""
    if record is None or record.state == State.DISABLED:
        return ""
    how = ("sync" if record.mode == Mode.SYNC
           else f"async every {record.interval_s} s")
    rpo = record.rpo
    behind = "" if rpo is None or record.mode == Mode.SYNC else f", {rpo:.0f} s behind"
    return (f"{how} {record.primary} -> {record.replica}, {record.state.value}{behind} "
            f"(generation {record.generation})")


def local_disk_paths(definition: Any, shared_storage: Path | None) -> list[Path]:
    """The disk and drive files outside the cluster's shared storage (without one,
    every file is this host's own)."""
    paths = [Path(disk.path) for disk in definition.disks if disk.path]
    if shared_storage is None:
        return paths
    root = shared_storage.resolve()
    return [path for path in paths if not path.resolve().is_relative_to(root)]
