"""What the service does when it starts and when the host shuts down.

Start: re-adopt every QEMU that kept running while the service was away (no VM is
restarted), mark VMs whose QEMU died meanwhile as crashed, stop QEMUs nobody owns,
remove directories of deleted VMs; then apply the automatic start actions.
Host shutdown: apply each running VM's automatic stop action (save, shut down, turn off).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid

from parvisor.errors import ParvisorError
from parvisor.model.states import ACTIVE_STATES, VmState
from parvisor.model.vm import AutoStartAction, AutoStopAction
from parvisor.ops.disks import vm_disk_dir
from parvisor.store.base import VmRecord
from parvisor.vm.paths import VmPaths, vms_dir
from parvisor.vm.process import QemuProcess

log = logging.getLogger(__name__)
S = VmState


async def reconcile(manager) -> None:
    known = set()
    for record in manager.store.list_vms():
        known.add(record.uuid)
        await _reconcile_vm(manager, record)
    await _remove_orphans(manager, known)


async def _reconcile_vm(manager, record: VmRecord) -> None:
    runtime = manager.runtime(record.uuid)
    process = await QemuProcess.adopt(
        manager.paths(record.uuid), record.uuid,
        on_event=lambda name, data: manager._on_qmp_event(record, name, data))
    if process is not None:
        status = await process.query_status()
        observed = S.RUNNING if status.running else S.PAUSED
        if record.state != observed:
            record = manager.store.set_state(record.uuid, observed,
                                             "re-adopted after service restart")
        manager._attach(record, runtime, process)
        await manager.hotplug.after_adopt(record, runtime)   # back under its limits
        manager.event("adopted", f"{record.name}: re-adopted running QEMU (pid {process.pid})",
                      record, pid=process.pid)
        return
    if record.state == S.SAVING and manager.paths(record.uuid).saved_state.exists():
        manager.store.set_state(record.uuid, S.SAVED, "save finished while service was down")
    elif record.state in ACTIVE_STATES:
        reason = f"QEMU exited while the service was down (was {record.state})"
        manager.store.set_state(record.uuid, S.CRASHED, reason)
        manager.event("error", f"{record.name}: crashed: {reason}", record)


async def _remove_orphans(manager, known: set[str]) -> None:
    """Directories of VMs that are not in the store: a create or delete interrupted by a
    crash (runtime dirs under the state dir, own-disk dirs under the storage root)."""
    _remove_orphan_disk_dirs(manager, known)
    root = vms_dir(manager.config.state_dir)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name in known or not entry.is_dir():
            continue
        process = await QemuProcess.adopt(VmPaths(manager.config.state_dir, entry.name),
                                          entry.name)
        if process is not None:  # INV-5: no QEMU without an owner record
            log.warning("stopping orphan QEMU pid %s of deleted VM %s", process.pid, entry.name)
            await process.stop()
        shutil.rmtree(entry, ignore_errors=True)


def _remove_orphan_disk_dirs(manager, known: set[str]) -> None:
    # Only uuid-named directories: parvisor made them, and everything in one belongs to
    # that VM alone (user-given disks never live there).
    root = vm_disk_dir(tuple(manager.config.storage_roots), "x").parent
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.is_dir() and entry.name not in known and _is_uuid(entry.name):
            log.warning("removing files of VM %s, which is no longer defined", entry.name)
            shutil.rmtree(entry, ignore_errors=True)


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def wants_auto_start(record: VmRecord) -> bool:
    action = record.definition.auto_start_action
    if record.state not in (S.OFF, S.SAVED, S.CRASHED):
        return False
    if action == AutoStartAction.ALWAYS_START:
        return True
    # "start if it was running": the user's last word was start, and the VM is down
    # because the host went down (off or saved), not because it crashed.
    return (action == AutoStartAction.START_IF_RUNNING and record.desired_state == "running"
            and record.state in (S.OFF, S.SAVED))


async def auto_start(manager) -> list[asyncio.Task]:
    loop = asyncio.get_running_loop()
    return [loop.create_task(_delayed_start(manager, record))
            for record in manager.store.list_vms() if wants_auto_start(record)]


async def _delayed_start(manager, record: VmRecord) -> None:
    await asyncio.sleep(record.definition.auto_start_delay_s)
    try:
        result = await manager.start(record.name)
        if "job" in result:
            await manager.jobs.get(result["job"]["id"]).wait()
        manager.event("auto-start", f"{record.name}: started by its automatic start action",
                      record)
    except ParvisorError as exc:
        manager.event("error", f"{record.name}: automatic start failed: {exc.message}", record)


async def apply_stop_actions(manager) -> dict[str, str]:
    """Host is going down: save / shut down / turn off every running VM, in parallel.

    The desired state stays "running", so start-if-running brings them back at boot.
    """
    records = [r for r in manager.store.list_vms() if r.state in (S.RUNNING, S.PAUSED)]
    results = await asyncio.gather(*(_stop_one(manager, r) for r in records),
                                   return_exceptions=True)
    return {r.name: (res if isinstance(res, str) else f"failed: {res}")
            for r, res in zip(records, results)}


async def _stop_one(manager, record: VmRecord) -> str:
    action = record.definition.auto_stop_action
    runtime = manager.runtime(record.uuid)
    async with runtime.exclusive(f"host shutdown: {action.value}", record.name):
        if action == AutoStopAction.SAVE:
            await manager._save(record, runtime, None)
        elif action == AutoStopAction.SHUTDOWN:
            await manager._graceful_stop(record, runtime, manager.config.shutdown_timeout_s)
        else:
            await manager._turn_off(record, runtime)
    manager.store.set_state(record.uuid, manager.store.get_vm_by_uuid(record.uuid).state,
                            f"host shutdown: {action.value}", desired_state="running")
    return action.value
