"""Users' replication requests (``vm replication enable|status|disable|failover``):
validated against etcd, then recorded in ``replication/<uuid>`` with one
revision-checked transaction. The hosts' coordinators carry the record out.

What for: the API's replication routes call this on a cluster member. Every refusal
(same host, no room, a shared disk, enabling twice, a broken replica without --force,
...) comes from the pure rules in ``protocol`` / ``placement`` and is raised before
anything is written. ``enable`` reads the disks' virtual sizes with ``qemu-img info -U``
(the VM may be running), so it runs on the VM's primary host: the API forwards the
request to the owner; a VM whose local disks are on another host is refused here.

Never: write without comparing the revisions read (the record's, and for ``enable``
the owner and disk-host keys the primary was taken from); start a failover from here
(the cluster manager does, in its one owner+generation transaction).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from parvisor.cluster.etcd_kv import cmp_absent, cmp_mod, op_put
from parvisor.errors import Busy, InvalidInput, NotFound, Refused
from parvisor.model.vm import DiskSpec
from parvisor.replication.placement import (ReplicaCandidate, disable_request,
                                            enable_request)
from parvisor.replication.protocol import (COPY_USABLE, DEFAULT_STALL_LIMIT_S, Mode,
                                           ReplicationRecord, State, failover_verdict,
                                           protection, request_force)
from parvisor.storage.qemu_img import inspect_image

WRITE_RETRIES = 10          # disable/force re-apply on a record the hosts keep updating
MAX_STALL_LIMIT_S = 120.0   # sync: a guest write stalled longer times out in most guests


class NeedsCluster(Refused):
    """Replication copies disks between cluster hosts: refused on a standalone host, or
    for an action only a host running the replication service can carry out."""

    code = "not_a_cluster_member"
    http_status = 409


class FailoverRefused(Refused):
    """A failover request that the current replica or primary state does not allow."""

    code = "failover_refused"
    http_status = 409


def virtual_size(disk: DiskSpec) -> int:
    """A disk's virtual size; ``-U`` inside ``inspect_image``: the VM may hold it open."""
    return inspect_image(Path(disk.path or ""), disk.format).virtual_size


def replicated_disks(disks: tuple[DiskSpec, ...]) -> list[DiskSpec]:
    """The disks a replica copies: writable disks (CD/DVD media and read-only disks are
    the same on every host, or not the VM's data)."""
    return [d for d in disks if d.media == "disk" and not d.readonly and d.path]


def live_rpo(record: ReplicationRecord, now: float) -> float | None:
    """Seconds of writes a failover now would lose: 0 for sync in-sync, the age of the
    last consistent point while the replica holds a usable copy, None when unknown or
    there is no copy. Wall clocks of two hosts: never negative."""
    if record.mode == Mode.SYNC and record.state == State.IN_SYNC:
        return 0.0
    if record.state in COPY_USABLE and record.last_consistent_at is not None:
        return max(0.0, now - record.last_consistent_at)
    return None


class ReplicationRequests:
    def __init__(self, vms: Any, *, clock: Callable[[], float] = time.time,
                 disk_size: Callable[[DiskSpec], int] = virtual_size) -> None:
        if getattr(vms.store, "kv", None) is None:
            raise NeedsCluster("this host is not a cluster member: replication copies a "
                               "VM's disks to another cluster host (see parvisor cluster "
                               "create)")
        self.vms = vms
        self.kv = vms.store.kv
        self.keys = vms.store.keys
        self.here = vms.config.host_name
        self.clock = clock
        self.disk_size = disk_size

    # --- reading ----------------------------------------------------------------------
    def read(self, vm_uuid: str) -> ReplicationRecord | None:
        item = self.kv.get(self.keys.replication(vm_uuid))
        return ReplicationRecord.from_json(item.value, item.mod_revision) if item else None

    def _required(self, name: str) -> tuple[Any, ReplicationRecord]:
        vm = self.vms.store.get_vm(name)
        record = self.read(vm.uuid)
        if record is None:
            raise NotFound(f"VM '{name}' is not replicated (enable it with: parvisor vm "
                           f"replication enable {name} --mode sync|async)", vm=name)
        return vm, record

    def _is_member(self, host: str) -> bool:
        return self.kv.get(self.keys.member(host)) is not None

    def _candidates(self) -> list[ReplicaCandidate]:
        """Every registered host as a replica candidate. The membership key holds the
        live registration (newer than ``hosts/`` after a restart): preferred."""
        hosts, _ = self.kv.get_prefix(self.keys.under("hosts"))
        members, _ = self.kv.get_prefix(self.keys.under("members"))
        maint, _ = self.kv.get_prefix(self.keys.under("maint"))
        docs = {_tail(i.key): json.loads(i.value) for i in hosts}
        live = {_tail(i.key): json.loads(i.value) for i in members}
        in_maint = {_tail(i.key) for i in maint}
        return [ReplicaCandidate(name, member=name in live,
                                 site=(live.get(name) or doc).get("site", ""),
                                 free_bytes=(live.get(name) or doc).get("replica_free_bytes"),
                                 maintenance=name in in_maint)
                for name, doc in sorted({**docs, **live}.items())]

    # --- enable -----------------------------------------------------------------------
    def enable(self, name: str, mode: str, interval: str | None = None,
               to: str | None = None,
               stall_limit_s: float | None = None) -> dict[str, Any]:
        vm = self.vms.store.get_vm(name)
        existing = self.read(vm.uuid)
        owner_item = self.kv.get(self.keys.owner(vm.uuid))
        disk_item = self.kv.get(self.keys.disk_host(vm.uuid))
        primary = (json.loads(owner_item.value)["host"] if owner_item is not None
                   else disk_item.value.decode() if disk_item is not None else None)
        disks = replicated_disks(vm.definition.disks)
        shared = [d.id for d in vm.definition.disks if d.shared]
        _check_limit(stall_limit_s)
        refused_anyway = shared or (existing is not None and existing.state != State.DISABLED)
        if not refused_anyway:      # these refusals come from enable_request below
            self._check_primary(name, primary, disks)
            self._check_not_migrating(vm)
        sizes = {} if refused_anyway else {d.id: self.disk_size(d) for d in disks}
        disk_bytes = sum(sizes.values())
        record, note = enable_request(vm.uuid, name, primary or "", mode=mode,
                                      interval=interval, disk_bytes=disk_bytes,
                                      shared_disks=shared, existing=existing,
                                      hosts=self._candidates(), to=to)
        record = replace(record, images={record.primary: {d.id: d.path for d in disks}},
                         disk_sizes=sizes,
                         stall_limit_s=stall_limit_s or DEFAULT_STALL_LIMIT_S)
        guards = [_guard(self.keys.replication(vm.uuid), existing),
                  _guard(self.keys.owner(vm.uuid), owner_item),
                  _guard(self.keys.disk_host(vm.uuid), disk_item)]
        ok, revision, _ = self.kv.txn(guards, [op_put(self.keys.replication(vm.uuid),
                                                      record.to_json())])
        if not ok:
            raise Busy(f"VM '{name}' changed while replication was being enabled (its "
                       "host or its replication record); try again", vm=name)
        record = replace(record, revision=revision)
        interval_text = f", every {record.interval_s} s" if record.mode == Mode.ASYNC else ""
        self.vms.event("replication", f"{name}: {record.mode.value} replication "
                       f"{record.primary} -> {record.replica}{interval_text} enabled", vm)
        return {**self._status(vm, record), "note": note}

    def _check_primary(self, name: str, primary: str | None, disks: list[DiskSpec]) -> None:
        if primary is None:
            raise Refused(f"VM '{name}' has no host yet: start it first (replication "
                          "copies the disks of the host that runs it)", vm=name)
        if primary != self.here:
            raise Refused(f"the disks of VM '{name}' are on host {primary}: enable its "
                          f"replication there (this is {self.here})", vm=name, host=primary)
        if not disks:
            raise InvalidInput(f"VM '{name}' has no writable disk to replicate", vm=name)

    def _check_not_migrating(self, vm: Any) -> None:
        """A migrating VM changes its primary (and disk paths with --with-storage)."""
        migrations = getattr(self.vms, "migrations", None)
        current = migrations.read(vm.uuid) if migrations is not None else None
        if current is not None and not current.terminal:
            raise Busy(f"VM '{vm.name}' is migrating ({current.source} -> "
                       f"{current.destination}); enable replication once it ended",
                       vm=vm.name)

    # --- status -----------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any]:
        vm, record = self._required(name)
        return self._status(vm, record)

    def _status(self, vm: Any, record: ReplicationRecord) -> dict[str, Any]:
        verdict = failover_verdict(record)
        data = record.public()
        rpo = live_rpo(record, self.clock())
        done = (100 * record.bytes_done // record.disk_bytes
                if record.disk_bytes and record.state in (State.INITIAL_SYNC,
                                                          State.RESYNCING) else None)
        primary_images = record.images.get(record.primary, {})
        replica_images = record.images.get(record.replica, {})
        data.update(
            rpo_s=rpo, progress_percent=done, failover_allowed=verdict.allowed,
            primary_up=self._is_member(record.primary),
            replica_up=self._is_member(record.replica),
            protection=protection(vm.definition.ha, self._on_shared_storage(vm), record),
            disks=[{"id": disk_id, "primary_path": primary_images.get(disk_id),
                    "replica_path": replica_images.get(disk_id),
                    "export": record.exports.get(disk_id)}
                   for disk_id in sorted({*primary_images, *replica_images,
                                          *record.exports})])
        return data

    def _on_shared_storage(self, vm: Any) -> bool:
        check = getattr(self.vms, "on_shared_storage", None)
        if check is not None:
            return bool(check(vm))
        return self.kv.get(self.keys.disk_host(vm.uuid)) is None

    # --- disable / force: pure moves re-applied to the newest record ---------------------
    def disable(self, name: str) -> dict[str, Any]:
        vm, _ = self._required(name)
        record, note = self._apply(vm, disable_request)
        self.vms.event("replication", f"{name}: replication disabled ({note})", vm)
        return {**self._status(vm, record), "note": note}

    def _apply(self, vm: Any, move: Callable[[ReplicationRecord], Any]
               ) -> tuple[ReplicationRecord, str]:
        """``move(current) -> record | (record, note)``, written with the current
        revision; a record changed meanwhile (progress, cycles) is read and moved again."""
        key = self.keys.replication(vm.uuid)
        for _ in range(WRITE_RETRIES):
            current = self.read(vm.uuid)
            if current is None:
                raise NotFound(f"VM '{vm.name}' is not replicated (any more)", vm=vm.name)
            result = move(current)
            new, note = result if isinstance(result, tuple) else (result, "")
            ok, revision, _ = self.kv.txn([cmp_mod(key, current.revision)],
                                          [op_put(key, new.to_json())])
            if ok:
                return replace(new, revision=revision), note
        raise Busy(f"the replication record of VM '{vm.name}' kept changing; try again",
                   vm=vm.name)

    # --- failover ---------------------------------------------------------------------
    async def failover(self, name: str, *, force: bool = False, planned: bool = False,
                       test: bool = False, test_stop: bool = False) -> dict[str, Any]:
        chosen = [flag for flag, on in (("--force", force), ("--planned", planned),
                                        ("--test", test), ("--test-stop", test_stop)) if on]
        if len(chosen) > 1:
            raise InvalidInput(f"choose one of {', '.join(chosen)}", flags=chosen)
        if planned or test or test_stop:
            return await self._coordinated(name, planned=planned, test=test)
        return await asyncio.to_thread(self.unplanned_failover, name, force=force)

    def unplanned_failover(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """The primary is down: say whether and at what cost the cluster manager fails
        the VM over (``force``: record that the user accepts losing data)."""
        vm, record = self._required(name)
        if self._is_member(record.primary):
            raise FailoverRefused(
                f"primary {record.primary} is running (a live cluster member): use "
                f"--planned to move {name} to {record.replica} with no data loss",
                vm=name, primary=record.primary)
        if force:
            return self._force(vm)
        verdict = failover_verdict(record)
        if not verdict.allowed:
            raise FailoverRefused(f"failover of {name} refused: {verdict.reason}",
                                  vm=name, state=record.state.value)
        if not vm.definition.ha:
            raise FailoverRefused(
                f"{name} is not HA: the cluster restarts only HA VMs after a host failure "
                f"(make it HA; then it restarts on {record.replica}: {verdict.reason})",
                vm=name)
        return {**self._status(vm, record),
                "note": f"the cluster manager restarts {name} on {record.replica} once "
                        f"{record.primary} is fenced: {verdict.reason}"}

    def _force(self, vm: Any) -> dict[str, Any]:
        record, _ = self._apply(vm, request_force)
        verdict = failover_verdict(record)
        self.vms.event("replication", f"{vm.name}: forced failover requested by the user "
                       f"({verdict.reason})", vm)
        return {**self._status(vm, record),
                "note": f"recorded: the cluster manager restarts {vm.name} on "
                        f"{record.replica} once {record.primary} is fenced; {verdict.reason}"}

    def acting_host(self, name: str, *, planned: bool = False, test: bool = False,
                    test_stop: bool = False) -> str | None:
        """The host whose coordinator carries a failover out: the primary pauses its
        guest for ``--planned``; the replica boots the throwaway copy of its image for
        ``--test``/``--test-stop``; None: any member (etcd only, or nothing to read)."""
        if not (planned or test or test_stop):
            return None
        record = self.read(self.vms.store.get_vm(name).uuid)
        if record is None:
            return None                 # refused where it arrives: not replicated
        return record.primary if planned else record.replica

    async def _coordinated(self, name: str, *, planned: bool, test: bool) -> dict[str, Any]:
        coordinator = getattr(self.vms, "replication", None)
        what = "planned" if planned else "test" if test else "stopping a test"
        if coordinator is None:
            raise NeedsCluster(f"{what} failover needs a cluster host that runs the "
                               "replication service; this one does not", vm=name)
        if planned:
            result = await coordinator.planned_failover(name)
        elif test:
            result = await coordinator.test_failover(name)
        else:
            result = await coordinator.stop_test_failover(name)
        return _jsonable(result, name)


def _tail(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _guard(key: str, item: Any) -> dict:
    """Compare what was read: absent stays absent, present keeps its revision."""
    if item is None:
        return cmp_absent(key)
    return cmp_mod(key, item.revision if isinstance(item, ReplicationRecord)
                   else item.mod_revision)


def _check_limit(stall_limit_s: float | None) -> None:
    if stall_limit_s is not None and not 0 < stall_limit_s <= MAX_STALL_LIMIT_S:
        raise InvalidInput(f"stall limit {stall_limit_s} s: must be more than 0 and at "
                           f"most {MAX_STALL_LIMIT_S:.0f} s", stall_limit_s=stall_limit_s)


def _jsonable(result: Any, name: str) -> dict[str, Any]:
    """The coordinator's answer as a JSON object (a dict, a record, or a note)."""
    if isinstance(result, dict):
        return result
    if hasattr(result, "public"):
        return result.public()
    return {"vm": name, "result": "" if result is None else str(result)}
