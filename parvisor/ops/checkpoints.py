"""Checkpoints (Hyper-V's snapshots): ``vm checkpoint create|list|apply|delete``.

Design: qcow2 *internal* snapshots on every writable disk of the VM, tagged
``pv-<checkpoint id>``; with memory, RAM and device state go into the snapshot of the
first such disk (QEMU's ``snapshot-save``). A stopped VM's files are changed with
``qemu-img snapshot``; a running VM's through QMP (``parvisor.ops.checkpoint_qmp``).
Internal snapshots share clusters by refcount, so deleting any checkpoint of a chain
never takes data from another one: nothing has to be merged. Why not external
overlays is written in docs/io-model.md.

Every operation is a protocol with a recorded phase (``Checkpoint.phase``): the record
is written *before* the disks change and finished after, so a crash in between leaves
a record that says what was under way; ``detect_interrupted`` finds those at service
start. Refusals (wrong VM, wrong state, template, raw disks, names) change nothing.
This module never builds QEMU command lines and never touches disks of other VMs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from parvisor.errors import AlreadyExists, Busy, InvalidInput, NotFound, StateError
from parvisor.model.checkpoint import Checkpoint, CheckpointDisk, checkpoint_from_document
from parvisor.model.states import VmState
from parvisor.model.vm import DiskSpec, VmDefinition
from parvisor.ops import checkpoint_qmp
from parvisor.ops.copy_requests import CreateCheckpoint
from parvisor.ops.jobs import Job
from parvisor.storage import snapshots
from parvisor.store.base import VmRecord
from parvisor.vm.argv import disk_node_names

log = logging.getLogger(__name__)
S = VmState
QEMU_STATES = (S.RUNNING, S.PAUSED)                 # QEMU holds the images: use QMP
CREATE_STATES = (S.OFF, S.CRASHED, S.RUNNING, S.PAUSED)
# A saved VM's memory file belongs to its present disks: applying discards it
# (like Hyper-V); deleting a checkpoint does not touch the present state at all.
APPLY_STATES = (*CREATE_STATES, S.SAVED)
DELETE_STATES = APPLY_STATES


def snapshot_disks(definition: VmDefinition) -> list[DiskSpec]:
    """The disks a checkpoint covers: every writable disk (CDs and read-only disks
    cannot change, so they need no snapshot). All must be qcow2."""
    disks = [d for d in definition.disks if d.media == "disk" and not d.readonly and d.path]
    shared = [d.id for d in disks if d.shared]
    if shared:
        # refused, not left out: applying such a checkpoint would bring this node back
        # to a past while the shared disk stays in the present (Hyper-V 2012 R2 too)
        raise InvalidInput(f"VM '{definition.name}' has shared disk(s) {', '.join(shared)} "
                           "(guest clustering): checkpoints are refused, since the other "
                           "VMs keep writing it; remove the shared disk first, or back it "
                           "up from inside the guest cluster", vm=definition.name,
                           disks=shared)
    raw = [d.id for d in disks if d.format != "qcow2"]
    if raw:
        raise InvalidInput(f"VM '{definition.name}': checkpoints need qcow2 disks; "
                           f"{', '.join(raw)} {'is' if len(raw) == 1 else 'are'} raw "
                           "(convert with 'parvisor disk convert')", vm=definition.name,
                           disks=raw)
    if not disks:
        raise InvalidInput(f"VM '{definition.name}' has no writable disk to checkpoint",
                           vm=definition.name)
    return disks


def _check_state(action: str, record: VmRecord, allowed: tuple[VmState, ...]) -> None:
    if record.state not in allowed:
        raise StateError(action, record.state.value, [s.value for s in allowed],
                         vm=record.name)
    if record.definition.template:
        raise InvalidInput(f"VM '{record.name}' is a template: its disks are the parents "
                           "of linked clones and must not change", vm=record.name)


class CheckpointManager:
    """Checkpoint operations over a ``VmManager`` (store, runtimes, jobs, events)."""

    def __init__(self, vms: Any) -> None:
        self.vms = vms
        self.store = vms.store

    # --- reading ----------------------------------------------------------------------
    def checkpoints(self, vm_uuid: str) -> list[Checkpoint]:
        return [checkpoint_from_document(d) for d in self.store.list_checkpoints(vm_uuid)]

    def find(self, record: VmRecord, wanted: str) -> Checkpoint:
        """A checkpoint of *this* VM by name or id; one of another VM is refused by name."""
        for checkpoint in self.checkpoints(record.uuid):
            if wanted in (checkpoint.name, checkpoint.id):
                return checkpoint
        for other in self.store.list_vms():
            if other.uuid != record.uuid and any(
                    wanted in (c.name, c.id) for c in self.checkpoints(other.uuid)):
                raise InvalidInput(
                    f"checkpoint {wanted!r} belongs to VM '{other.name}', not to "
                    f"'{record.name}': a VM can only return to its own checkpoints",
                    vm=record.name, owner=other.name, checkpoint=wanted)
        raise NotFound(f"VM '{record.name}' has no checkpoint {wanted!r}",
                       vm=record.name, checkpoint=wanted)

    def list(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        items = self.checkpoints(record.uuid)
        current = self.store.current_checkpoint(record.uuid)
        names = {c.id: c.name for c in items}
        rows = [{**c.to_document(), "snapshot": c.snapshot,
                 "parent_name": names.get(c.parent), "current": c.id == current,
                 "children": [k.id for k in items if k.parent == c.id]} for c in items]
        return {"vm": name, "current": current, "checkpoints": rows}

    # --- create -----------------------------------------------------------------------
    def create(self, name: str, request: CreateCheckpoint) -> Job:
        record = self.store.get_vm(name)
        _check_state("create a checkpoint of", record, CREATE_STATES)
        disks = snapshot_disks(record.definition)
        if request.with_memory and record.state not in QEMU_STATES:
            raise InvalidInput(f"VM '{name}' is {record.state.value}: there is no running "
                               "memory to save (leave out --with-memory)", vm=name)
        existing = self.checkpoints(record.uuid)
        label = request.name or _default_name({c.name for c in existing})
        if any(c.name == label for c in existing):
            raise AlreadyExists(f"VM '{name}' already has a checkpoint named {label!r}",
                                vm=name, checkpoint=label)
        checkpoint = Checkpoint(
            vm_uuid=record.uuid, name=label, parent=self.store.current_checkpoint(record.uuid),
            with_memory=request.with_memory,
            vmstate_disk=disks[0].id if request.with_memory else None,
            disks=tuple(CheckpointDisk(id=d.id, path=d.path) for d in disks))
        return self._job("checkpoint-create", record, CREATE_STATES,
                         lambda rec, job: self._create(rec, checkpoint, job))

    async def _create(self, record: VmRecord, checkpoint: Checkpoint, job: Job) -> Any:
        self.store.put_checkpoint(checkpoint.to_document(), create=True)     # phase 1
        job.report(0.1, "taking snapshots")
        try:
            if record.state in QEMU_STATES:
                await self._create_live(record, checkpoint)
            else:
                await asyncio.to_thread(_create_offline, checkpoint)
        except BaseException:
            await self._undo_create(record, checkpoint)
            raise
        ready = checkpoint.with_phase("ready")
        self.store.put_checkpoint(ready.to_document(), create=False, make_current=True)
        self.vms.event("checkpoint", f"{record.name}: checkpoint '{ready.name}' created"
                       + (" with memory" if ready.with_memory else ""), record,
                       checkpoint=ready.id)
        return ready.to_document()

    async def _create_live(self, record: VmRecord, checkpoint: Checkpoint) -> None:
        qmp = self._qmp(record)
        nodes = self._nodes(record.definition, checkpoint)
        if checkpoint.with_memory:
            vmstate = self._node(record.definition, checkpoint.vmstate_disk)
            await checkpoint_qmp.save_with_memory(qmp, checkpoint.snapshot, vmstate, nodes)
        else:
            await checkpoint_qmp.snapshot_disks(qmp, checkpoint.snapshot, nodes)

    async def _undo_create(self, record: VmRecord, checkpoint: Checkpoint) -> None:
        """A failed create leaves no tag and no record (best effort: a tag that cannot
        be removed now is removed by the record's later delete)."""
        try:
            await self._remove_snapshots(self.store.get_vm_by_uuid(record.uuid), checkpoint)
            self.store.delete_checkpoint(record.uuid, checkpoint.id)
        except Exception as exc:      # keep the original error; the record says 'creating'
            log.error("%s: undoing checkpoint %s failed: %s", record.name, checkpoint.id, exc)

    # --- apply ------------------------------------------------------------------------
    def apply(self, name: str, wanted: str) -> Job:
        record = self.store.get_vm(name)
        checkpoint = self.find(record, wanted)
        _check_state("apply a checkpoint to", record, APPLY_STATES)
        if checkpoint.phase not in ("ready", "applying"):
            raise InvalidInput(f"checkpoint {checkpoint.name!r} was interrupted while "
                               f"{checkpoint.phase}; delete it", vm=name,
                               checkpoint=checkpoint.name, phase=checkpoint.phase)
        _check_same_disks(record.definition, checkpoint)
        return self._job("checkpoint-apply", record, APPLY_STATES,
                         lambda rec, job: self._apply(rec, checkpoint, job))

    async def _apply(self, record: VmRecord, checkpoint: Checkpoint, job: Job) -> Any:
        self.store.put_checkpoint(checkpoint.with_phase("applying").to_document(),
                                  create=False)                              # phase 1
        runtime = self.vms.runtime(record.uuid)
        if record.state not in (S.OFF,) and not (checkpoint.with_memory
                                                 and record.state in QEMU_STATES):
            job.report(0.1, "turning the VM off")
            await self.vms._turn_off(record, runtime)       # saved/crashed/running -> off
            record = self.store.get_vm_by_uuid(record.uuid)
        if checkpoint.with_memory:
            await self._apply_with_memory(record, runtime, checkpoint, job)
        else:
            job.report(0.5, "reverting disks")
            await asyncio.to_thread(_apply_offline, checkpoint)
        ready = checkpoint.with_phase("ready")
        self.store.put_checkpoint(ready.to_document(), create=False, make_current=True)
        self.vms.event("checkpoint", f"{record.name}: checkpoint '{ready.name}' applied",
                       record, checkpoint=ready.id)
        return self.vms.show(record.name).model_dump(mode="json")

    async def _apply_with_memory(self, record: VmRecord, runtime: Any,
                                 checkpoint: Checkpoint, job: Job) -> None:
        if record.state not in QEMU_STATES:
            # Boot a QEMU for the VM, then replace its whole state (RAM, devices and
            # disks) with the checkpoint's: what the fresh guest did is discarded.
            job.report(0.2, "starting QEMU")
            await self.vms._launch(record, runtime)
            record = self.store.get_vm_by_uuid(record.uuid)
        job.report(0.5, "loading memory and disks")
        vmstate = self._node(record.definition, checkpoint.vmstate_disk)
        await checkpoint_qmp.load_with_memory(self._qmp(record), checkpoint.snapshot,
                                              vmstate, self._nodes(record.definition,
                                                                   checkpoint))
        runtime.reset_guest_facts()
        asyncio.get_running_loop().create_task(self.vms._sync_guest_time(record))

    # --- delete -----------------------------------------------------------------------
    def delete(self, name: str, wanted: str) -> Job:
        record = self.store.get_vm(name)
        checkpoint = self.find(record, wanted)
        _check_state("delete a checkpoint of", record, DELETE_STATES)
        return self._job("checkpoint-delete", record, DELETE_STATES,
                         lambda rec, job: self._delete(rec, checkpoint))

    async def _delete(self, record: VmRecord, checkpoint: Checkpoint) -> Any:
        self.store.put_checkpoint(checkpoint.with_phase("deleting").to_document(),
                                  create=False)                              # phase 1
        await self._remove_snapshots(record, checkpoint)
        self.store.delete_checkpoint(record.uuid, checkpoint.id)             # phase 2
        self.vms.event("checkpoint", f"{record.name}: checkpoint '{checkpoint.name}' "
                       "deleted", record, checkpoint=checkpoint.id)
        return {"deleted": checkpoint.name, "vm": record.name}

    async def _remove_snapshots(self, record: VmRecord, checkpoint: Checkpoint) -> None:
        """Drop the tag from every disk of the checkpoint: through QMP for disks the
        running QEMU has open, with qemu-img for the others; missing tags are fine."""
        live = {d.id for d in record.definition.disks} if record.state in QEMU_STATES \
            else set()
        attached = [d for d in checkpoint.disks if d.id in live]
        if attached:
            await checkpoint_qmp.delete(self._qmp(record), checkpoint.snapshot,
                                        self._nodes(record.definition, checkpoint))
        offline = [d for d in checkpoint.disks if d.id not in live and Path(d.path).exists()]
        for disk in offline:
            await asyncio.to_thread(snapshots.delete_snapshot, Path(disk.path),
                                    checkpoint.snapshot, missing_ok=True)

    # --- helpers ----------------------------------------------------------------------
    def _job(self, kind: str, record: VmRecord, states: tuple[VmState, ...],
             step: Any) -> Job:
        runtime = self.vms.runtime(record.uuid)
        if runtime.lock.locked():
            raise Busy(f"VM '{record.name}' is busy: {runtime.operation} in progress",
                       vm=record.name, operation=runtime.operation)

        async def work(job: Job) -> Any:
            async with runtime.exclusive(kind, record.name):
                current = self.store.get_vm_by_uuid(record.uuid)   # may have moved on
                _check_state(kind.replace("-", " "), current, states)
                return await step(current, job)
        return self.vms.jobs.start(kind, work, vm_name=record.name)

    def _qmp(self, record: VmRecord) -> Any:
        process = self.vms.runtime(record.uuid).process
        if process is None:
            raise StateError("reach QEMU of", record.state.value, [], vm=record.name)
        return process.qmp

    @staticmethod
    def _node(definition: VmDefinition, disk_id: str | None) -> str:
        disk = next(d for d in definition.disks if d.id == disk_id)
        return disk_node_names(disk)[1]

    def _nodes(self, definition: VmDefinition, checkpoint: Checkpoint) -> list[str]:
        ids = {d.id for d in checkpoint.disks}
        return [disk_node_names(d)[1] for d in definition.disks if d.id in ids]


def _default_name(taken: set[str]) -> str:
    base = time.strftime("ckpt-%Y%m%d-%H%M%S")
    return next(n for n in [base, *(f"{base}-{i}" for i in range(2, 1000))]
                if n not in taken)


def _check_same_disks(definition: VmDefinition, checkpoint: Checkpoint) -> None:
    """The VM's writable disks must be the ones the checkpoint covered: a disk added
    later has no snapshot to return to, a removed one would be reverted behind the
    VM's back."""
    now = {(d.id, d.path) for d in snapshot_disks(definition)}
    then = {(d.id, d.path) for d in checkpoint.disks}
    if now != then:
        raise InvalidInput(f"VM '{definition.name}': its disks changed since checkpoint "
                           f"{checkpoint.name!r} (then: {sorted(i for i, _ in then)}, now: "
                           f"{sorted(i for i, _ in now)})", vm=definition.name,
                           checkpoint=checkpoint.name)


def _create_offline(checkpoint: Checkpoint) -> None:
    done: list[Path] = []
    try:
        for disk in checkpoint.disks:
            snapshots.create_snapshot(Path(disk.path), checkpoint.snapshot)
            done.append(Path(disk.path))
    except BaseException:
        for path in done:                   # all disks or none
            snapshots.delete_snapshot(path, checkpoint.snapshot, missing_ok=True)
        raise


def _apply_offline(checkpoint: Checkpoint) -> None:
    # Not atomic across disks: a crash here leaves phase 'applying', and applying the
    # same checkpoint again completes it (reverting a disk twice is harmless).
    for disk in checkpoint.disks:
        snapshots.apply_snapshot(Path(disk.path), checkpoint.snapshot)


# --- service start --------------------------------------------------------------------------
def detect_interrupted(vms: Any) -> list[str]:
    """Checkpoint operations a dead service left half-done: report each (event), and
    finish what is safe without the user: a 'creating' checkpoint of a stopped VM
    never became usable, so its partial tags and record are removed."""
    manager, found = CheckpointManager(vms), []
    for record in vms.store.list_vms():
        for checkpoint in manager.checkpoints(record.uuid):
            if checkpoint.phase == "ready":
                continue
            found.append(checkpoint.id)
            advice = {"creating": "delete it", "applying": "apply it again",
                      "deleting": "delete it again"}[checkpoint.phase]
            if checkpoint.phase == "creating" and record.state not in QEMU_STATES:
                for disk in checkpoint.disks:
                    if Path(disk.path).exists():
                        snapshots.delete_snapshot(Path(disk.path), checkpoint.snapshot,
                                                  missing_ok=True)
                vms.store.delete_checkpoint(record.uuid, checkpoint.id)
                advice = "its partial snapshots were removed"
            vms.event("error", f"{record.name}: checkpoint '{checkpoint.name}' was "
                      f"interrupted while {checkpoint.phase}; {advice}", record,
                      checkpoint=checkpoint.id, phase=checkpoint.phase)
    return found
