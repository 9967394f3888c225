"""Live migration inside the host service: requests from the API, and this host's side
of every migration record in etcd (source or destination).

What for: the two hosts never call each other. Each service polls the ``migration/``
records (``POLL_S``), asks ``protocol.next_step`` what its side must do, and runs that
step as a task on the service's event loop; the other side sees the result in the
record. So either service may restart at any phase and resolve from the record alone.

Order that keeps one running copy (INV-1, INV-4, INV-5): the destination's QEMU is
started with ``-S`` and images activated only at ``cont``; the source's QEMU ends the
stream paused; the owner record moves in the same txn that writes ``switched``; only
then does the destination resume, and the source only ever quits its paused copy.

Never: write a phase without comparing the record's revision; resume the source after
the switch; leave a failed request's destination QEMU or disk files behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.migration_host import with_disk_paths
from parvisor.cluster.etcd_kv import cmp_absent, cmp_mod, op_put
from parvisor.errors import (Busy, InvalidInput, MigrationCancelled, MigrationFailed,
                             NotFound, ParvisorError, Refused, StateError)
from parvisor.migration import engine
from parvisor.migration.policy import ConvergencePolicy
from parvisor.migration.protocol import (CANCELLABLE, LocalFacts, MigrationOptions,
                                         MigrationRecord, Phase, Step, next_step)
from parvisor.model.states import VmState
from parvisor.testing.crashpoints import crashpoint

log = logging.getLogger("parvisor.migration")
POLL_S = 0.25
PROGRESS_WRITE_S = 0.5          # progress in etcd: often enough for a CLI bar
PREPARE_TIMEOUT_S = 60.0        # destination must listen within this (TCG start ≈ 1 s)
FINISH_WAIT_S = 60.0            # source waits this long for the destination's resume
ABORT_WAIT_S = 30.0             # source waits this long for the destination's clean-up
RESTORE_WAIT_S = 120.0          # quick migration: the destination's restore
WORKING_STATES = (VmState.RUNNING, VmState.PAUSED)


class MigrationRefused(Refused):
    """The move cannot start (incompatible destination, wrong state): 409."""

    code = "migration_refused"
    http_status = 409


class MigrationCoordinator:
    def __init__(self, vms: Any, host: str, *, migration_address: str,
                 max_concurrent: int = 2, tls_wanted: bool = False,
                 tls_dir: Path | None = None) -> None:
        self.vms = vms                      # ClusterVmManager
        self.store = vms.store
        self.kv = vms.store.kv
        self.keys = vms.store.keys
        self.host = host
        self.migration_address = migration_address
        self.max_concurrent = max_concurrent
        self.tls_wanted = tls_wanted                   # [cluster] migration_tls
        self.tls_dir = tls_dir                         # its QEMU TLS files (None: missing)
        self.tasks: dict[str, asyncio.Task] = {}       # vm uuid -> the task on it
        self.incoming: dict[str, Any] = {}             # vm uuid -> destination QemuProcess
        self._cancel: set[str] = set()                 # cancel seen for these uuids
        self._errors: dict[str, str] = {}              # a step's task died: why
        self._stopping = False

    # --- keys -------------------------------------------------------------------------
    def key(self, vm_uuid: str) -> str:
        return self.keys.migration(vm_uuid)

    def read(self, vm_uuid: str) -> MigrationRecord | None:
        item = self.kv.get(self.key(vm_uuid))
        return MigrationRecord.from_json(item.value, item.mod_revision) if item else None

    def _records(self) -> list[MigrationRecord]:
        items, _ = self.kv.get_prefix(self.keys.under("migration"))
        return [MigrationRecord.from_json(i.value, i.mod_revision) for i in items]

    async def write(self, record: MigrationRecord, extra_compares: list[dict] | None = None,
                    extra_ops: list[dict] | None = None) -> MigrationRecord | None:
        """Put ``record`` if the key still has ``record.revision``; the stored record
        (with its new revision) or None when somebody else wrote first."""
        compares = [cmp_mod(self.key(record.vm_uuid), record.revision), *(extra_compares or [])]
        ops = [op_put(self.key(record.vm_uuid), record.to_json()), *(extra_ops or [])]
        ok, revision, _ = await asyncio.to_thread(self.kv.txn, compares, ops)
        return replace(record, revision=revision) if ok else None

    # --- API side (any host) ----------------------------------------------------------
    def request(self, name: str, destination: str, options: MigrationOptions) -> dict[str, Any]:
        """Validate and record a migration; the source's service carries it out."""
        record = self.store.get_vm(name)
        owner, owner_rev = self.vms._cluster_doc("owner", record.uuid)
        source = owner["host"] if owner else None
        if record.state == VmState.OFF:
            return self._move_stopped(record, source, destination, options)
        self._check_request(record, source, destination, options)
        previous = self.read(record.uuid)
        if previous is not None and not previous.terminal:
            raise Busy(f"VM '{name}' is already migrating ({previous.source} -> "
                       f"{previous.destination}, {previous.phase})", vm=name)
        new = MigrationRecord(
            vm_uuid=record.uuid, vm_name=name, source=source or "", destination=destination,
            phase=Phase.REQUESTED, owner_revision=owner_rev, options=options,
            requested_at=time.time(), source_was_running=record.state == VmState.RUNNING)
        guard = (cmp_absent(self.key(record.uuid)) if previous is None
                 else cmp_mod(self.key(record.uuid), previous.revision))
        ok, revision, _ = self.kv.txn(
            [guard, cmp_mod(self.keys.owner(record.uuid), owner_rev)],
            [op_put(self.key(record.uuid), new.to_json())])
        if not ok:
            raise Busy(f"VM '{name}' changed while the migration was requested "
                       "(another migration or a move); try again", vm=name)
        self.vms.event("migration", f"{name}: migration to {destination} requested", record)
        return replace(new, revision=revision).public()

    def _move_stopped(self, record: Any, source: str | None, destination: str,
                      options: MigrationOptions) -> dict[str, Any]:
        """A VM that is off moves as its definition: the destination becomes its first
        preferred host, so the cluster starts it there (disks on shared storage)."""
        name = record.name
        if self.kv.get(self.keys.host(destination)) is None:
            raise NotFound(f"no cluster host named {destination!r}", host=destination)
        if options.with_storage:
            raise MigrationRefused(f"VM '{name}' is off: --with-storage moves disks of "
                                   "running VMs only; start it first (or copy its disks)")
        if not self.vms.on_shared_storage(record):
            raise MigrationRefused(f"VM '{name}' has disks outside the cluster's shared "
                                   "storage; start it and migrate with --with-storage")
        previous = self.read(record.uuid)
        if previous is not None and not previous.terminal:
            raise Busy(f"VM '{name}' is already migrating", vm=name)
        hosts = (destination, *(h for h in record.definition.preferred_hosts
                                if h != destination))
        self.store.update_definition(
            record.definition.model_copy(update={"preferred_hosts": hosts}),
            record.generation)
        done = MigrationRecord(
            vm_uuid=record.uuid, vm_name=name, source=source or "", destination=destination,
            phase=Phase.COMPLETED, owner_revision=0, options=options,
            requested_at=time.time(), source_was_running=False,
            result={"total_time_ms": 0, "downtime_ms": 0, "transferred_bytes": 0,
                    "source": source or "", "destination": destination,
                    "note": "VM is off: it starts on the destination next time"})
        guard = (cmp_absent(self.key(record.uuid)) if previous is None
                 else cmp_mod(self.key(record.uuid), previous.revision))
        self.kv.txn([guard], [op_put(self.key(record.uuid), done.to_json())])
        self.vms.event("migration", f"{name}: moved to {destination} (off: it starts "
                       "there next time)", record)
        return self.read(record.uuid).public()

    def _check_request(self, record: Any, source: str | None, destination: str,
                       options: MigrationOptions) -> None:
        name = record.name
        if self.kv.get(self.keys.host(destination)) is None:
            raise NotFound(f"no cluster host named {destination!r}", host=destination)
        if source is None or record.state not in WORKING_STATES:
            raise StateError("migrate", record.state.value, [s.value for s in WORKING_STATES],
                             vm=name)
        if source == destination:
            raise InvalidInput(f"VM '{name}' already runs on {destination}", vm=name)
        runtime = self.vms.runtimes.get(record.uuid)
        if runtime is not None and runtime.lock.locked():   # asked on the owner host
            raise Busy(f"VM '{name}' is busy: {runtime.operation} in progress", vm=name,
                       operation=runtime.operation)
        if self.kv.get(self.keys.member(destination)) is None:
            raise MigrationRefused(f"host {destination} is not a live cluster member",
                                   host=destination)
        if not options.live and (options.with_storage or self.vms.shared_storage is None):
            raise MigrationRefused("quick migration needs the cluster's shared storage "
                                   "(the saved state and the disks stay there)")
        if self.kv.get(self.keys.maintenance(destination)) is not None:
            raise MigrationRefused(f"host {destination} is in maintenance (drain)",
                                   host=destination)

    def cancel(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        for _ in range(5):
            current = self.read(record.uuid)
            if current is None or current.terminal:
                raise StateError("cancel the migration of", "not migrating",
                                 ["migrating"], vm=name)
            if current.phase not in CANCELLABLE:
                raise StateError("cancel the migration of", f"past the switch "
                                 f"({current.phase})", [p.value for p in CANCELLABLE], vm=name)
            ok, revision, _ = self.kv.txn(
                [cmp_mod(self.key(record.uuid), current.revision)],
                [op_put(self.key(record.uuid),
                        replace(current, cancel_requested=True).to_json())])
            if ok:
                return replace(current, cancel_requested=True, revision=revision).public()
        raise Busy(f"the migration of VM '{name}' kept changing; try again", vm=name)

    def get(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        current = self.read(record.uuid)
        if current is None:
            raise NotFound(f"VM '{name}' has no migration on record", vm=name)
        return current.public()

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping:
            try:
                records = await asyncio.to_thread(self._records)
                members = await asyncio.to_thread(self._members)
            except (ClusterUnavailable, ParvisorError) as exc:
                log.debug("migration poll failed: %s", exc)
                await asyncio.sleep(POLL_S)
                continue
            for record in records:
                self._consider(record, members)
            await asyncio.sleep(POLL_S)

    def _members(self) -> set[str]:
        items, _ = self.kv.get_prefix(self.keys.under("members"))
        return {item.key.rsplit("/", 1)[-1] for item in items}

    def _consider(self, record: MigrationRecord, members: set[str]) -> None:
        task = self.tasks.get(record.vm_uuid)
        if record.terminal:
            self._cancel.discard(record.vm_uuid)    # a new request starts uncancelled
        elif record.cancel_requested and record.role_of(self.host) == "source":
            self._cancel.add(record.vm_uuid)
        peer = record.destination if record.source == self.host else record.source
        facts = LocalFacts(self.host, working=task is not None and not task.done(),
                           has_copy=self._has_copy(record),
                           peer_is_member=peer in members)
        step = next_step(record, facts)
        if step == Step.NOTHING:
            return
        if step == Step.CHECK_AND_PREPARE and self._busy_slots() >= self.max_concurrent:
            return      # queued: stays ``requested`` until a slot frees
        handler: Callable[[MigrationRecord], Awaitable[None]] = getattr(self, f"_{step.value}")
        self.tasks[record.vm_uuid] = asyncio.get_running_loop().create_task(
            self._guarded(handler, record), name=f"migration-{step.value}-{record.vm_name}")

    def _busy_slots(self) -> int:
        return sum(1 for task in self.tasks.values() if not task.done())

    def _has_copy(self, record: MigrationRecord) -> bool:
        if record.vm_uuid in self.incoming:
            return True
        runtime = self.vms.runtimes.get(record.vm_uuid)
        return runtime is not None and runtime.process is not None

    async def _guarded(self, handler: Callable[[MigrationRecord], Awaitable[None]],
                       record: MigrationRecord) -> None:
        try:
            await handler(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next poll resolves from the record
            log.exception("migration of %s: %s failed", record.vm_name, handler.__name__)
            self._errors[record.vm_uuid] = f"{handler.__name__.strip('_')} failed: {exc}"

    async def stop(self) -> None:
        self._stopping = True
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- waiting on the other side -------------------------------------------------------
    async def _wait_for(self, vm_uuid: str, phases: set[Phase], timeout: float,
                        what: str) -> MigrationRecord | None:
        """The record once its phase is in ``phases`` or terminal, or a cancel was asked
        before the switch; None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ClusterUnavailable):
                record = await asyncio.to_thread(self.read, vm_uuid)
                if record is None:
                    return None
                if record.phase in phases or record.terminal or (
                        record.cancel_requested and record.phase in CANCELLABLE):
                    return record
            await asyncio.sleep(POLL_S)
        log.warning("migration of %s: timed out waiting for %s", vm_uuid, what)
        return None

    # --- source steps -------------------------------------------------------------------
    async def _check_and_prepare(self, record: MigrationRecord) -> None:
        from parvisor.migration.checks import refusals, source_machine_type
        self._cancel.discard(record.vm_uuid)
        self._errors.pop(record.vm_uuid, None)
        vm = self.store.get_vm_by_uuid(record.vm_uuid)
        runtime = self.vms.runtimes.get(record.vm_uuid)
        reasons = [] if runtime and runtime.process else [f"VM '{vm.name}' is not running "
                                                          f"on {self.host}"]
        if record.cancel_requested:
            await self.write(record.to(Phase.CANCELLED, reason="cancelled before start"))
            return
        reasons += await asyncio.to_thread(refusals, self, vm, record)
        if self.tls_wanted and self.tls_dir is None:
            reasons.append(f"migration_tls is on but {self.host} has no migration "
                           "certificates (see its service log)")
        if reasons:
            await self.write(record.to(Phase.FAILED, reason="; ".join(reasons)))
            self.vms.event("migration", f"{vm.name}: migration to {record.destination} "
                           f"refused: {'; '.join(reasons)}", vm)
            return
        sizes = await asyncio.to_thread(self._disk_sizes, vm) if record.options.with_storage else {}
        owned = {d.id: d.path for d in vm.definition.disks if d.id in sizes and d.owned}
        machine = await asyncio.to_thread(source_machine_type, self, vm)
        preparing = await self.write(record.to(
            Phase.PREPARING, source_was_running=vm.state == VmState.RUNNING,
            source_disks=sizes, source_owned=owned, tls=self.tls_dir is not None,
            machine_type=machine))
        crashpoint("migration.source.after_preparing")
        if preparing is not None:
            await self._perform(preparing)

    def _disk_sizes(self, vm: Any) -> dict[str, int]:
        from parvisor.storage.qemu_img import inspect_image
        return {d.id: inspect_image(Path(d.path), d.format).virtual_size
                for d in vm.definition.disks if _mirrored(d)}

    async def _perform(self, record: MigrationRecord) -> None:
        """From ``preparing`` to the switch, holding the VM's lock (other actions: 409)."""
        runtime = self.vms.runtime(record.vm_uuid)
        try:
            async with runtime.exclusive("migrate", record.vm_name):
                await self._stream(record, runtime)
        except Busy as exc:
            await self._abort_before_switch(record, f"VM busy: {exc.message}")
        await self._settle(record.vm_uuid)

    async def _settle(self, vm_uuid: str) -> None:
        """Outside the VM's lock (the VM is usable again): wait for the other side to
        end the migration, then write its end."""
        latest = await asyncio.to_thread(self.read, vm_uuid)
        if latest is None:
            return
        if latest.phase == Phase.ABORTING:
            end = await self._wait_for(vm_uuid, {Phase.FAILED, Phase.CANCELLED},
                                       ABORT_WAIT_S, "the destination to clean up")
            if end is None:
                await self._finalise_abort(await asyncio.to_thread(self.read, vm_uuid)
                                           or latest)
        elif latest.phase in (Phase.SWITCHED, Phase.FINISHED):
            finished = await self._wait_for(vm_uuid, {Phase.FINISHED}, FINISH_WAIT_S,
                                            "the destination to resume the VM")
            if finished is not None:    # else: a later poll completes the record
                await self._complete(finished)

    async def _stream(self, record: MigrationRecord, runtime: Any) -> None:
        ready = await self._wait_for(record.vm_uuid, {Phase.PREPARED, Phase.ABORTING},
                                     PREPARE_TIMEOUT_S, "the destination to prepare")
        if ready is None or ready.phase != Phase.PREPARED:
            await self._abort_before_switch(ready or record, _why_stopped(ready, "the destination did not prepare in time"))
            return
        performing = await self.write(ready.to(Phase.PERFORMING))
        crashpoint("migration.source.after_performing")
        if performing is None:      # cancel written meanwhile: read it and abort
            await self._abort_before_switch(self.read(record.vm_uuid) or ready, "cancelled")
            return
        if not performing.options.live:
            await self._quick_move(performing, runtime)
            return
        process = runtime.process
        policy = _policy(performing.options)
        progress = _ProgressWriter(self, performing)
        try:
            tls = _tls_args(self.tls_dir if performing.tls else None, performing.incoming_uri)
            if performing.nbd_uri:
                nodes = engine.mirrored_nodes(self.store.get_vm_by_uuid(record.vm_uuid).definition)
                await engine.mirror_disks(process, performing.nbd_uri, nodes, progress.update,
                                          **tls)
            result = await engine.migrate_out(
                process, performing.incoming_uri, policy, on_progress=progress.update,
                cancelled=lambda: performing.vm_uuid in self._cancel,
                mirroring=bool(performing.nbd_uri), **tls)
        except ParvisorError as exc:
            await progress.stop()
            await self._abort_before_switch(progress.record, exc.message,
                                            cancelled=isinstance(exc, MigrationCancelled))
            return
        await progress.stop()     # mirrors were completed at the switchover (engine)
        crashpoint("migration.source.before_switch")     # source paused, nothing switched
        await self._switch(progress.record, runtime, result)

    async def _quick_move(self, record: MigrationRecord, runtime: Any) -> None:
        """Quick migration: hold the VM here without running it (owner phase ``stop``,
        so no agent restarts it), save its state to shared storage (QEMU quits), then
        the usual switch; the destination's agent restores it from that file."""
        owner_key = self.keys.owner(record.vm_uuid)
        started = time.monotonic()
        ok, revision, _ = await asyncio.to_thread(
            self.kv.txn, [cmp_mod(owner_key, record.owner_revision)],
            [op_put(owner_key, json.dumps({"host": self.host, "phase": "stop"}))])
        held = await self.write(replace(record, owner_revision=revision)) if ok else None
        if held is None:
            await self._abort_before_switch(record, "the VM changed hands meanwhile")
            return
        vm = self.store.get_vm_by_uuid(record.vm_uuid)
        try:
            await self.vms._save(vm, runtime, None)
        except ParvisorError as exc:
            await self._abort_before_switch(held, f"saving the VM failed: {exc.message}")
            return
        state = self.vms.paths(record.vm_uuid).saved_state
        elapsed = round((time.monotonic() - started) * 1000)
        result = {"total_time_ms": elapsed, "downtime_ms": elapsed,
                  "transferred_bytes": state.stat().st_size if state.exists() else 0,
                  "note": "quick migration: the guest resumes once the destination "
                          "restored it"}
        await self._switch(held, runtime, result)

    async def _switch(self, record: MigrationRecord, runtime: Any, result: Any) -> None:
        """The one txn: owner -> destination and ``switched``, both or neither."""
        current = await asyncio.to_thread(self.read, record.vm_uuid) or record
        if current.cancel_requested or current.phase != Phase.PERFORMING:
            await self._abort_before_switch(current, "cancelled", cancelled=True)
            return
        owner_key = self.keys.owner(record.vm_uuid)
        switched = current.to(Phase.SWITCHED, result=_result_dict(result, current))
        compares, ops = self._definition_change(current)
        compares.append(cmp_mod(owner_key, current.owner_revision))
        ops.append(op_put(owner_key, json.dumps({"host": current.destination, "phase": "run"})))
        try:
            done = await self.write(switched, compares, ops)
        except ClusterUnavailable:
            done = await self._outcome_after_timeout(current)
        if done is None or done.phase != Phase.SWITCHED:
            await self._abort_before_switch(self.read(record.vm_uuid) or current,
                                            "the ownership switch was refused (the VM "
                                            "changed hands or the migration was cancelled)")
            return
        log.info("migration of %s: switched to %s", record.vm_name, record.destination)
        crashpoint("migration.source.after_switch")
        await self._drop_copy(done, runtime)

    async def _outcome_after_timeout(self, record: MigrationRecord) -> MigrationRecord | None:
        """The switch txn timed out: it may have committed. Keep the source paused and
        read until etcd answers; never guess (resuming could make two copies)."""
        while True:
            try:
                return await asyncio.to_thread(self.read, record.vm_uuid)
            except ClusterUnavailable:
                await asyncio.sleep(POLL_S)

    def _definition_change(self, record: MigrationRecord) -> tuple[list[dict], list[dict]]:
        """Shared-nothing: the definition names the destination's disk files, and the
        disk host is the destination, from the switch on (same txn as the owner)."""
        if not record.dest_disks:
            return [], []
        vm = self.store.get_vm_by_uuid(record.vm_uuid)
        compares, ops = self.store.definition_txn_parts(
            with_disk_paths(vm.definition, record.dest_disks), vm)
        return compares, [*ops, op_put(self.keys.disk_host(record.vm_uuid),
                                       record.destination)]

    async def _drop_copy(self, record: MigrationRecord, runtime: Any) -> None:
        """After the switch: quit the paused source copy and unplug its taps (``_settle``
        then waits for the destination's resume and writes ``completed``)."""
        await self.vms.drop_migrated_copy(record.vm_uuid)

    async def _complete(self, record: MigrationRecord) -> None:
        if record.options.with_storage:
            self.vms.remove_moved_disks(record.source_owned)
        await self.write(record.to(Phase.COMPLETED))
        vm = self.store.get_vm_by_uuid(record.vm_uuid)
        self.vms.event("migration", f"{record.vm_name}: migrated {record.source} -> "
                       f"{record.destination} in {record.result.get('total_time_ms')} ms "
                       f"(downtime {record.result.get('downtime_ms')} ms)", vm)

    async def _drop_source_copy(self, record: MigrationRecord) -> None:
        """A restarted source finds the switch done: its paused copy must go."""
        runtime = self.vms.runtimes.get(record.vm_uuid)
        if runtime is not None and runtime.process is not None:
            await self.vms.drop_migrated_copy(record.vm_uuid)
        if record.phase == Phase.FINISHED:
            await self._complete(record)

    async def _abort_before_switch(self, record: MigrationRecord, reason: str, *,
                                   cancelled: bool = False) -> None:
        """Resume the source (it is still the owner), tell the destination to clean."""
        runtime = self.vms.runtimes.get(record.vm_uuid)
        if runtime is not None and runtime.process is not None:
            done = await engine.recover_source(runtime.process,
                                               was_running=record.source_was_running)
            log.info("migration of %s aborted (%s): source %s", record.vm_name, reason, done)
        if not record.options.live:
            await asyncio.to_thread(self._release_quick_hold, record)
        self._cancel.discard(record.vm_uuid)
        latest = await asyncio.to_thread(self.read, record.vm_uuid) or record
        if latest.terminal:
            return      # the destination gave up and cleaned already
        if latest.phase == Phase.REQUESTED:
            await self.write(latest.to(Phase.CANCELLED if cancelled else Phase.FAILED,
                                       reason=reason))
            return
        if latest.phase != Phase.ABORTING:
            cancelled = cancelled or latest.cancel_requested
            latest = await self.write(latest.to(Phase.ABORTING, reason=(
                "cancelled" if cancelled else reason))) or latest
        vm = self.store.get_vm_by_uuid(record.vm_uuid)
        self.vms.event("migration", f"{record.vm_name}: migration to {record.destination} "
                       f"stopped, VM stays on {self.host}: {latest.reason or reason}", vm)

    def _release_quick_hold(self, record: MigrationRecord) -> None:
        """A quick migration that did not switch: the owner record back to ``run`` on
        this host, so its agent keeps (or, from the saved state, restarts) the VM."""
        owner_key = self.keys.owner(record.vm_uuid)
        item = self.kv.get(owner_key)
        if item is None:
            return
        owner = json.loads(item.value)
        if owner == {"host": self.host, "phase": "stop"}:
            self.kv.txn([cmp_mod(owner_key, item.mod_revision)],
                        [op_put(owner_key, json.dumps({"host": self.host, "phase": "run"}))])

    async def _finalise_abort(self, record: MigrationRecord) -> None:
        if record.phase != Phase.ABORTING:
            return
        end = Phase.CANCELLED if record.reason == "cancelled" else Phase.FAILED
        await self.write(record.to(end, reason=record.reason + " (destination did not "
                                   "report its clean-up; it cleans when it returns)"))

    async def _recover_source(self, record: MigrationRecord) -> None:
        reason = self._errors.pop(record.vm_uuid, "the source service restarted mid-way")
        await self._abort_before_switch(record, reason)
        await self._settle(record.vm_uuid)

    # --- destination steps --------------------------------------------------------------
    async def _prepare_incoming(self, record: MigrationRecord) -> None:
        if not record.options.live:
            await self._prepare_quick(record)
            return
        try:
            process, dest_disks = await self.vms.launch_incoming(
                record.vm_uuid, record.source_disks if record.options.with_storage else None,
                record.machine_type)
        except ParvisorError as exc:
            await self._dest_abort(record, f"destination {self.host} cannot start the VM: "
                                   f"{exc.message}")
            return
        self.incoming[record.vm_uuid] = process
        crashpoint("migration.dest.after_launch")
        try:
            if record.tls and self.tls_dir is None:
                raise MigrationFailed(f"the source encrypts, but {self.host} has no "
                                      "migration certificates (migration_tls)")
            tls_dir = self.tls_dir if record.tls else None
            policy = _policy(record.options)
            port = engine.free_port(self.migration_address)
            uri = await engine.prepare_incoming(process, self.migration_address, port,
                                                policy=policy, tls_creds_dir=tls_dir)
            nbd = None
            if dest_disks:
                nodes = engine.mirrored_nodes(self.store.get_vm_by_uuid(record.vm_uuid).definition)
                nbd = await engine.export_disks(process, self.migration_address,
                                                engine.free_port(self.migration_address), nodes,
                                                tls_creds_dir=tls_dir)
        except ParvisorError as exc:
            await self._dest_abort(record, f"destination {self.host}: {exc.message}")
            return
        prepared = await self.write(record.to(Phase.PREPARED, incoming_uri=uri, nbd_uri=nbd,
                                              dest_disks=dest_disks))
        crashpoint("migration.dest.after_prepared")
        if prepared is None:
            await self._dest_abort(self.read(record.vm_uuid) or record, "cancelled")
            return
        await self._await_switch(prepared)

    async def _prepare_quick(self, record: MigrationRecord) -> None:
        """Quick migration: nothing to start before the switch (this host's agent
        restores the saved state after it); only check there is room."""
        try:
            vm = self.store.get_vm_by_uuid(record.vm_uuid)
            await asyncio.to_thread(self.vms._check_room_for, vm)
        except ParvisorError as exc:
            await self._dest_abort(record, f"destination {self.host}: {exc.message}")
            return
        prepared = await self.write(record.to(Phase.PREPARED))
        if prepared is not None:
            await self._await_switch(prepared)

    async def _await_switch(self, record: MigrationRecord) -> None:
        """Hold the incoming copy until the source switches or gives up."""
        while True:
            current = await self._wait_for(record.vm_uuid,
                                           {Phase.SWITCHED, Phase.ABORTING, Phase.FAILED,
                                            Phase.CANCELLED}, 3600, "the switch")
            if current is None:
                continue
            if current.phase == Phase.SWITCHED:
                await self._resume_incoming(current)
            elif current.phase in (Phase.ABORTING, Phase.FAILED, Phase.CANCELLED):
                await self._abort_incoming(current)
            else:
                await asyncio.sleep(POLL_S)   # cancel requested: the source acts on it
                continue
            return

    async def _resume_incoming(self, record: MigrationRecord) -> None:
        crashpoint("migration.dest.before_resume")
        if not record.options.live:
            await self._wait_restored(record)
            return
        process = self.incoming.pop(record.vm_uuid, None)
        if record.options.with_storage and process is not None:
            await engine.stop_export(process)
        await self.vms.adopt_incoming(record.vm_uuid, process, record.source_was_running)
        await self.write(record.to(Phase.FINISHED))
        log.info("migration of %s: running on %s", record.vm_name, self.host)

    async def _wait_restored(self, record: MigrationRecord) -> None:
        """Quick migration: this host's agent restores the VM (owner switched here);
        ``finished`` once its QEMU runs (or, after the wait, anyway: the cluster's
        crash/restart rules take over from here)."""
        deadline = time.monotonic() + RESTORE_WAIT_S
        while time.monotonic() < deadline:
            runtime = self.vms.runtimes.get(record.vm_uuid)
            if runtime is not None and runtime.process is not None and \
                    self.store.get_vm_by_uuid(record.vm_uuid).state == VmState.RUNNING:
                break
            await asyncio.sleep(POLL_S)
        await self.write(record.to(Phase.FINISHED))

    async def _abort_incoming(self, record: MigrationRecord) -> None:
        """Kill the incoming copy and its new disk files; report the clean-up."""
        process = self.incoming.pop(record.vm_uuid, None)
        await self.vms.drop_incoming(record.vm_uuid, process, record.dest_disks)
        latest = await asyncio.to_thread(self.read, record.vm_uuid) or record
        if latest.phase in (Phase.PREPARING, Phase.PREPARED, Phase.PERFORMING):
            reason = self._errors.pop(record.vm_uuid,
                                      f"destination {self.host} restarted during the migration")
            latest = await self.write(latest.to(Phase.ABORTING, reason=reason)) or latest
        if latest.phase == Phase.ABORTING:
            end = Phase.CANCELLED if latest.reason == "cancelled" else Phase.FAILED
            await self.write(latest.to(end, dest_cleaned=True))
        elif latest.terminal and not latest.dest_cleaned:
            await self.write(replace(latest, dest_cleaned=True))

    async def _dest_abort(self, record: MigrationRecord, reason: str) -> None:
        process = self.incoming.pop(record.vm_uuid, None)
        await self.vms.drop_incoming(record.vm_uuid, process, record.dest_disks)
        latest = await asyncio.to_thread(self.read, record.vm_uuid) or record
        if latest.phase in (Phase.PREPARING, Phase.PREPARED):
            aborting = await self.write(latest.to(Phase.ABORTING, reason=reason))
            if aborting is not None:
                await self.write(aborting.to(Phase.FAILED, dest_cleaned=True))
        log.warning("migration of %s: %s", record.vm_name, reason)


# --- small helpers ------------------------------------------------------------------------
class _ProgressWriter:
    """Keeps the record's ``progress`` fresh in etcd without blocking the stream."""

    def __init__(self, coordinator: MigrationCoordinator, record: MigrationRecord) -> None:
        self.coordinator = coordinator
        self.record = record
        self.latest: dict[str, Any] | None = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def update(self, progress: Any) -> None:
        self.latest = _as_dict(progress)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_WRITE_S)
            if self.latest is None:
                continue
            with contextlib.suppress(ClusterUnavailable):
                written = await self.coordinator.write(replace(self.record,
                                                               progress=self.latest))
                if written is not None:
                    self.record = written
                else:   # somebody else wrote (cancel): take their record
                    fresh = await asyncio.to_thread(self.coordinator.read,
                                                    self.record.vm_uuid)
                    if fresh is not None:
                        self.record = fresh
                        if fresh.cancel_requested:
                            self.coordinator._cancel.add(fresh.vm_uuid)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        fresh = await asyncio.to_thread(self.coordinator.read, self.record.vm_uuid)
        if fresh is not None:
            self.record = fresh


def _tls_args(tls_dir: Path | None, uri: str | None) -> dict[str, Any]:
    if tls_dir is None:
        return {}
    # the destination's certificate names its migration address: check it
    return {"tls_creds_dir": tls_dir, "tls_hostname": engine.uri_host(uri or "")}


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    import dataclasses
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(vars(value))


def _result_dict(result: Any, record: MigrationRecord) -> dict[str, Any]:
    data = _as_dict(result)
    data.update(source=record.source, destination=record.destination, encrypted=record.tls)
    return data


def _policy(options: MigrationOptions) -> ConvergencePolicy:
    changes: dict[str, Any] = {}
    if options.max_downtime_ms is not None:
        changes["max_downtime_ms"] = options.max_downtime_ms
    if options.bandwidth_bytes_per_s is not None:
        changes["bandwidth_bytes_per_s"] = options.bandwidth_bytes_per_s
    return replace(ConvergencePolicy(), **changes)


def _mirrored(disk: Any) -> bool:
    """Shared-nothing moves writable disks; read-only media must exist on both hosts."""
    return disk.media == "disk" and not disk.readonly and disk.path is not None


def _why_stopped(record: MigrationRecord | None, default: str) -> str:
    if record is not None and record.cancel_requested:
        return "cancelled"
    if record is not None and record.reason:
        return record.reason
    return default

