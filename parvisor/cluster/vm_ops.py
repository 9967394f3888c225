"""VM actions on a cluster member: the cluster decides where a VM runs.

What for: on a standalone host ``vm start`` launches QEMU right here. In a cluster the
request only records the wish (desired state ``running``) and the cluster manager
places the VM (preferred hosts, free memory, anti-affinity); the owner's agent then
starts it through ``start_here``. Stop requests for a VM running on another host are
recorded the same way and carried out by its owner. ``vm list``/``vm show`` on any host
report the owner host and the HA protection from the owner and status keys.

Never: launch a VM that has no owner record naming this host (only the agent calls
``start_here``); clear an owner record while that owner is not a live member (its VM
may still be running there, INV-1).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import cmp_mod, op_delete
from parvisor.cluster.local_host import reset_for_takeover
from parvisor.cluster.migration_host import MigrationHostActions
from parvisor.errors import Busy, Refused
from parvisor.model.states import VmState
from parvisor.model.vm import VmStatus
from parvisor.ops.vms import VmManager
from parvisor.store.base import VmRecord
from parvisor.vm.paths import VmPaths

DRAIN_SHUTDOWN_TIMEOUT_S = 30.0
SAVED_STATES_DIR = "saved-states"      # under the shared storage path    # graceful stop before a drain hand-off, then power-off


class OwnedElsewhere(Refused):
    """The VM belongs to another host that may still run it: nothing is changed here."""

    code = "wrong_host"
    http_status = 409


class ClusterVmManager(MigrationHostActions, VmManager):
    shared_storage: Path | None = None      # set by the cluster runtime
    migrations: Any = None                  # MigrationCoordinator, set by the runtime

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
        return base.model_copy(update={"host": owner["host"] if owner else "-",
                                       "ha_status": self._ha_status(record, current),
                                       "migration": self._migration_line(record)})

    def _migration_line(self, record: VmRecord) -> str:
        migration = self.migrations.read(record.uuid) if self.migrations else None
        if migration is None or migration.terminal:
            return ""
        line = f"{migration.source} -> {migration.destination}, {migration.phase}"
        left = migration.progress.get("ram_remaining")
        return line + (f" ({left >> 20} MiB of RAM left)" if left else "")

    def _ha_status(self, record: VmRecord, status: dict | None) -> str:
        if status and status["phase"] == "error":
            return f"{'waiting' if status['retryable'] else 'error'}: {status['reason']}"
        if not record.definition.ha:
            return "not HA"
        if not self.on_shared_storage(record):
            return "not protected: disks on local storage"
        return "protected"

    def on_shared_storage(self, record: VmRecord) -> bool:
        if self.shared_storage is None:
            return True
        root = self.shared_storage.resolve()
        return all(Path(disk.path).resolve().is_relative_to(root)
                   for disk in record.definition.disks if disk.path)

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
        result = await super().delete(name, force)
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
        await super().start(self.store.get_vm_by_uuid(vm_uuid).name)

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
