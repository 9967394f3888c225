"""Test failover (``vm replication failover NAME --test`` / ``--test-stop``), carried out
by the replica host's coordinator: boot a throwaway copy of the replica on an isolated
switch while replication goes on, and throw it away again.

What for: Hyper-V's "Test Failover": prove that the replica boots and holds the data
without touching the primary or the replica set. Here:

1. each replica image is copied at one point in time by its qemu-storage-daemon
   (``blockdev-backup sync=full``: copy-before-write keeps the point while the primary
   goes on writing into the image) into ``<replica root>/test-copies/<name>-test/
   <disk>.qcow2`` (not under the VM's uuid: tools that find a VM's QEMU by its uuid in
   the command line must not take the test VM for a second run of the original). In
   async mode the image node is the one under the open cycle's overlay, i.e. the last
   consistent cycle: exactly what a failover would boot;
2. a private switch ``<name>-test`` and a VM ``<name>-test`` (not HA, every NIC on that
   switch, disks = the copies) are created through the cluster VM manager and started;
   the disks are local here, so the manager places it on this host.

``--test-stop`` turns the test VM off, deletes it, its copies and the switch.

While a copy runs the coordinator leaves the record alone (``coordinator.planned``):
no async cycle is committed into the image being read and no target is restarted
under the job.

Never: stop, pause or write the replica image or the replication; create a test copy
on the primary or a second one while one exists; make the test VM HA; put a test NIC on
any switch but the test switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import time
from pathlib import Path
from typing import Any

from parvisor.errors import (AlreadyExists, Busy, NotFound, ParvisorError, QmpError,
                             Refused, ReplicationFailed, StateError)
from parvisor.model.states import ACTIVE_STATES
from parvisor.model.validation import validate_model
from parvisor.model.vm import KernelBoot, VmDefinition
from parvisor.ops.disk_requests import AttachDisk
from parvisor.ops.requests import CreateVm, NicRequest
from parvisor.replication.protocol import (COPY_USABLE, Mode, ReplicationRecord, State,
                                           format_point)
from parvisor.replication.target import IMAGE_NODE, ReplicaTarget
from parvisor.storage.qemu_img import create_image, inspect_image
from parvisor.switch.model import SwitchDefinition

log = logging.getLogger("parvisor.replication")

SUFFIX = "-test"
COPY_TIMEOUT_S = 3600.0
JOB_POLL_S = 0.1
STOP_TIMEOUT_S = 60.0           # the test VM runs on another host: its owner stops it


class TestCopyRefused(Refused):
    """No test copy here (not the replica host, its targets not running): nothing
    changed. (No consistent replica: ``StateError``.)"""

    __test__ = False            # not a pytest class
    code = "replication_refused"
    http_status = 409


# --- names and paths (pure) -------------------------------------------------------------
def test_vm_name(name: str) -> str:
    return f"{name}{SUFFIX}"


def test_switch_name(name: str) -> str:
    """``<name>-test`` within the switch name rules (no '.', at most 32 characters)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:32 - len(SUFFIX)]
    return f"{base}{SUFFIX}"


COPIES_DIR = "test-copies"


def copy_dir(root: Path, name: str) -> Path:
    return Path(root) / COPIES_DIR / test_vm_name(name)


def copy_path(root: Path, name: str, disk_id: str) -> Path:
    return copy_dir(root, name) / f"{disk_id}.qcow2"


# --- may a test copy be taken now (pure) ------------------------------------------------
def check_testable(record: ReplicationRecord | None, host: str, name: str) -> None:
    """Refuse unless this host holds a consistent replica of ``name``."""
    if record is None:
        raise NotFound(f"VM '{name}' is not replicated: no replica to test", vm=name)
    if record.replica != host:
        where = "its primary" if record.primary == host else "not its replica host"
        raise TestCopyRefused(f"test failover of {name} runs on its replica host "
                              f"{record.replica}; {host} is {where}", vm=name,
                              host=host, replica=record.replica)
    if not has_consistent_point(record):
        allowed = ([State.IN_SYNC.value, "broken with a consistent point"]
                   if record.mode == Mode.SYNC
                   else ["in-sync", "lagging", "broken", "resyncing (with a consistent "
                         "point)"])
        raise StateError("take a test failover copy of",
                         record.state.value, allowed, vm=name)


def has_consistent_point(record: ReplicationRecord) -> bool:
    """The replica image is one point in time: sync in-sync (or broken with a recorded
    point: the writes up to the break); async: the last committed cycle."""
    if record.mode == Mode.SYNC:
        return record.state == State.IN_SYNC or (
            record.state == State.BROKEN and record.last_consistent_at is not None)
    # async resync ships into cycle overlays: the image stays the last committed cycle
    return (record.state in COPY_USABLE | {State.RESYNCING}
            and record.last_consistent_at is not None)


def copy_point(record: ReplicationRecord, copied_at: float) -> str:
    """The point in time the test copy holds, for people."""
    if record.mode == Mode.SYNC and record.state == State.IN_SYNC:
        return f"{format_point(copied_at)} (sync: every write acknowledged by then)"
    return format_point(record.last_consistent_at)


# --- the test VM (pure) -----------------------------------------------------------------
def boot_fields(definition: VmDefinition, tiny_kernel: Path | None) -> dict[str, Any]:
    """CreateVm fields that boot like ``definition``. The tiny image's kernel lives in
    each host's own state dir: use this host's (``image="tiny"``) when it is the same
    file; any other kernel is given as it is (CreateVm checks it is in the roots)."""
    boot = definition.boot
    if not isinstance(boot, KernelBoot):
        return {}                   # boots from its (copied) disks
    if tiny_kernel is not None and Path(boot.kernel).resolve() == tiny_kernel.resolve():
        return {"image": "tiny", "cmdline": boot.cmdline or None}
    return {"kernel": boot.kernel, "initrd": boot.initrd, "cmdline": boot.cmdline or None}


def test_vm_request(definition: VmDefinition, name: str, copies: dict[str, Path],
                    switch: str, tiny_kernel: Path | None, note: str) -> CreateVm:
    """The test VM: ``definition``'s boot, CPUs, memory and platform; the copies as its
    disks (in the source's order); every NIC on ``switch``; never HA."""
    disks = [AttachDisk(path=str(copies[d.id]), bus=d.bus, format="qcow2")
             for d in definition.disks if d.id in copies]
    nics = [NicRequest(switch=switch, vlan=n.vlan, model=n.model) for n in definition.nics]
    fields: dict[str, Any] = {
        "name": test_vm_name(name), "vcpus": definition.vcpus,
        "memory": definition.memory_bytes, "generation": definition.generation,
        "secure_boot": definition.secure_boot, "tpm": definition.tpm,
        "os_type": definition.os_type, "disks": disks, "nics": nics, "ha": False,
        "notes": note[:4096], **boot_fields(definition, tiny_kernel)}
    if definition.max_vcpus > definition.vcpus:
        fields["max_vcpus"] = definition.max_vcpus
    if definition.max_memory_bytes > definition.memory_bytes:
        fields["max_memory"] = definition.max_memory_bytes
    return validate_model(CreateVm, fields)


def backup_commands(disk_id: str, dest: Path) -> tuple[dict, dict, str, str]:
    """QMP arguments (blockdev-add of the copy, blockdev-backup into it), node, job."""
    node, job = f"test-copy-{disk_id}", f"test-backup-{disk_id}"
    add = {"driver": "qcow2", "node-name": node,
           "file": {"driver": "file", "filename": str(dest)}}
    backup = {"job-id": job, "device": IMAGE_NODE, "target": node, "sync": "full",
              "auto-finalize": True, "auto-dismiss": False}
    return add, backup, node, job


# --- effects: one point-in-time copy ---------------------------------------------------
async def copy_replica_image(target: ReplicaTarget, disk_id: str, dest: Path, *,
                             timeout: float = COPY_TIMEOUT_S) -> None:
    """``target``'s image as it is now, into a new qcow2 ``dest``; the target keeps
    serving the primary meanwhile."""
    size = (await asyncio.to_thread(inspect_image, Path(target.spec.image),
                                    target.spec.format)).virtual_size
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)                # a leftover of an interrupted attempt
    await asyncio.to_thread(create_image, dest, "qcow2", size)
    add, backup, node, job = backup_commands(disk_id, dest)
    await target.execute("blockdev-add", add)
    try:
        await target.execute("blockdev-backup", backup)
        await _wait_job(target, job, timeout)
    finally:
        with contextlib.suppress(QmpError):
            await target.execute("blockdev-del", {"node-name": node})


async def _wait_job(target: ReplicaTarget, job: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            current = {j["id"]: j for j in await target.execute("query-jobs")}.get(job)
            if current is None:
                raise ReplicationFailed(f"the test copy job {job} vanished")
            if current["status"] == "concluded":
                await target.execute("job-dismiss", {"id": job})
                if current.get("error"):
                    raise ReplicationFailed(f"copying the replica failed: "
                                            f"{current['error']}", job=job)
                return
            if loop.time() >= deadline:
                raise ReplicationFailed(f"copying the replica took over {timeout:g} s")
            await asyncio.sleep(JOB_POLL_S)
    except BaseException:
        await _cancel_job(target, job)
        raise


async def _cancel_job(target: ReplicaTarget, job: str) -> None:
    """Best effort: cancel and dismiss ``job`` if it is still there."""
    with contextlib.suppress(ParvisorError):
        jobs = {j["id"]: j for j in await target.execute("query-jobs")}
        if job not in jobs:
            return
        if jobs[job]["status"] != "concluded":
            await target.execute("job-cancel", {"id": job, "force": True})
            for _ in range(200):
                jobs = {j["id"]: j for j in await target.execute("query-jobs")}
                if jobs.get(job, {}).get("status") in (None, "concluded"):
                    break
                await asyncio.sleep(JOB_POLL_S)
        if job in jobs:
            await target.execute("job-dismiss", {"id": job})


@contextlib.asynccontextmanager
async def _record_held(coordinator: Any, vm_uuid: str, name: str):
    """The coordinator leaves ``vm_uuid`` alone (its running step ends first)."""
    if vm_uuid in coordinator.planned:
        raise Busy(f"a failover or test copy of VM '{name}' is in progress", vm=name)
    coordinator.planned.add(vm_uuid)
    try:
        task = coordinator.tasks.get(vm_uuid)
        if task is not None and not task.done():
            await asyncio.wait({task})          # (gather would cancel it if we are)
        yield
    finally:
        coordinator.planned.discard(vm_uuid)


async def _copy_all(coordinator: Any, vm: Any, name: str
                    ) -> tuple[ReplicationRecord, dict[str, Path], float]:
    """The record (checked again once held) and one copy per replicated disk."""
    async with _record_held(coordinator, vm.uuid, name):
        record = await asyncio.to_thread(coordinator.read, vm.uuid)
        check_testable(record, coordinator.host, name)
        side = coordinator.replica.get(vm.uuid)
        wanted = sorted(record.images.get(record.primary, {}))
        if side is None or any(d not in side.targets or side.targets[d].exited
                                for d in wanted) or not wanted:
            raise TestCopyRefused(f"test failover of {name}: its replica targets are not "
                                  f"running on {coordinator.host} (yet); try again",
                                  vm=name, host=coordinator.host)
        copied_at = time.time()
        copies: dict[str, Path] = {}
        try:
            for disk in wanted:
                copies[disk] = copy_path(coordinator.root, name, disk)
                await copy_replica_image(side.targets[disk], disk, copies[disk])
        except BaseException:
            _remove_files(copies.values())
            raise
    return record, copies, copied_at


# --- the two requests -------------------------------------------------------------------
async def start_test_copy(coordinator: Any, name: str) -> dict[str, Any]:
    """``failover --test``: copies, the test switch, the test VM, started."""
    vms = coordinator.vms
    vm = await asyncio.to_thread(vms.store.get_vm, name)
    check_testable(await asyncio.to_thread(coordinator.read, vm.uuid),
                   coordinator.host, name)
    test, switch = test_vm_name(name), test_switch_name(name)
    await asyncio.to_thread(_check_no_test_copy, vms, name, test, switch)
    switch_def = validate_model(SwitchDefinition, {
        "name": switch, "type": "private", "notes": f"test failover of {name}"})
    record, copies, copied_at = await _copy_all(coordinator, vm, name)
    point = copy_point(record, copied_at)
    note = (f"test failover copy of {name} (replica on {coordinator.host}, point "
            f"{point}); remove it with: vm replication failover {name} --test-stop")
    created: list[str] = []
    try:
        await asyncio.to_thread(_give_to_qemu, vms, copies.values())
        await asyncio.to_thread(vms.switches.create, switch_def)
        created.append("switch")
        tiny = await asyncio.to_thread(_tiny_kernel, vms)
        request = test_vm_request(vm.definition, name, copies, switch, tiny, note)
        await asyncio.to_thread(vms.create, request)
        created.append("vm")
        await vms.start(test)
    except BaseException:
        await _undo(vms, test, switch, copies.values(), created)
        raise
    vms.event("replication", f"{name}: test failover copy {test} on {coordinator.host} "
              f"(point {point}, switch {switch})", vm)
    return {"vm": name, "test_vm": test, "switch": switch, "host": coordinator.host,
            "point": point, "disks": {d: str(p) for d, p in copies.items()},
            "replication": record.state.value,
            "result": f"test copy {test} of the replica at {point} created on "
                      f"{coordinator.host}",
            "note": f"{test} starts on {coordinator.host} on the isolated switch {switch};"
                    f" replication of {name} goes on. End it with --test-stop"}


def _check_no_test_copy(vms: Any, name: str, test: str, switch: str) -> None:
    if _exists(lambda: vms.store.get_vm(test)):
        raise AlreadyExists(f"a test failover of '{name}' exists already (VM {test}): "
                            "end it with --test-stop first", vm=name, test_vm=test)
    if _exists(lambda: vms.switches.get(switch)):
        raise AlreadyExists(f"switch {switch} exists already: a test failover of '{name}'"
                            " was not cleaned up; end it with --test-stop", vm=name,
                            switch=switch)


def _exists(read) -> bool:
    try:
        read()
    except NotFound:
        return False
    return True


def _tiny_kernel(vms: Any) -> Path | None:
    from parvisor.image.tiny import load_tiny_image
    image = load_tiny_image(vms.config.state_dir)
    return image.kernel if image is not None else None


def _give_to_qemu(vms: Any, paths) -> None:
    """QEMU may run as another user (``qemu_user``): it must write its disks."""
    user = vms._qemu_user()
    if user:
        entry = pwd.getpwnam(user)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _remove_files(paths) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(path).parent.rmdir()           # only when empty


async def _undo(vms: Any, test: str, switch: str, copies, created: list[str]) -> None:
    """A failed ``--test``: remove what it made (best effort; the error is reported)."""
    if "vm" in created:
        with contextlib.suppress(ParvisorError):
            await vms.delete(test, force=True)
    if "switch" in created:
        with contextlib.suppress(ParvisorError):
            await asyncio.to_thread(vms.switches.delete, switch)
    _remove_files(copies)


async def stop_test_copy(coordinator: Any, name: str) -> dict[str, Any]:
    """``failover --test-stop``: the test VM off and deleted (with its copies), the
    test switch deleted. NotFound when there is neither."""
    vms = coordinator.vms
    test, switch = test_vm_name(name), test_switch_name(name)
    removed: list[str] = []
    try:
        record = await asyncio.to_thread(vms.store.get_vm, test)
    except NotFound:
        record = None
    if record is not None:
        here = copy_dir(coordinator.root, name)
        copies = [d.path for d in record.definition.disks
                  if d.path and Path(d.path).parent == here]
        await _turn_off(vms, test)
        await vms.delete(test)
        _remove_files(copies)
        removed.append(f"VM {test}")
    if _exists(lambda: vms.switches.get(switch)):
        await asyncio.to_thread(vms.switches.delete, switch)
        removed.append(f"switch {switch}")
    if not removed:
        raise NotFound(f"VM '{name}' has no test failover copy (no VM {test}, no switch "
                       f"{switch})", vm=name)
    with contextlib.suppress(NotFound):
        vms.event("replication", f"{name}: test failover ended ({', '.join(removed)} "
                  "removed)", vms.store.get_vm(name))
    return {"vm": name, "removed": removed,
            "result": f"test failover of {name} ended: {', '.join(removed)} removed"}


async def _turn_off(vms: Any, test: str) -> None:
    """Off here, or asked of its owner host and waited for."""
    if (await asyncio.to_thread(vms.store.get_vm, test)).state not in ACTIVE_STATES:
        return
    await vms.turn_off(test)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_TIMEOUT_S
    while (await asyncio.to_thread(vms.store.get_vm, test)).state in ACTIVE_STATES:
        if loop.time() >= deadline:
            raise Busy(f"test VM {test} did not stop within {STOP_TIMEOUT_S:.0f} s; try "
                       "--test-stop again", vm=test)
        await asyncio.sleep(0.2)


__all__ = ["start_test_copy", "stop_test_copy", "check_testable", "test_vm_request",
           "copy_replica_image"]
