"""Changing a running VM without stopping it: processors, memory, dynamic-memory bounds
and resource controls (``vm set`` on a running VM), plus the hooks that (re)apply
resource controls and the balloon when QEMU starts, is re-adopted or exits.

Every change is checked first (a refusal changes nothing), then made in QEMU, and
written to the definition only after QEMU confirmed it, so a failed hot-plug leaves
the definition as it was and a restart comes back with exactly what was confirmed.
Multi-step requests (``--cpus 3 --memory 768M``) record each confirmed step.
Adapters: ``hotplug_devices`` (QMP) and ``parvisor.vm.cgroups``; decisions:
``hotplug_plan``. Network adapters and disks are in ``hotplug_io``.
"""

from __future__ import annotations

import logging
from typing import Any

from parvisor.errors import InvalidInput, ParvisorError, StateError
from parvisor.model.states import ACTIVE_STATES, VmState, check_action
from parvisor.model.validation import validate_model
from parvisor.model.vm import ResourceControls, VmDefinition, VmStatus
from parvisor.ops import hotplug_devices as qmp_dev
from parvisor.ops.hotplug_plan import cpu_plan, dimm_plan, throttle_arguments, virtio_mem_request
from parvisor.ops.requests import EditVm
from parvisor.store.base import VmRecord
from parvisor.vm.argv import disk_device_id
from parvisor.vm.cgroups import CgroupHost

log = logging.getLogger(__name__)
S = VmState
VIRTIO_MEM_SETTLE_S = 15.0     # how long to wait for the guest to (un)plug its blocks
GUEST_STATS_INTERVAL_S = 1
METADATA_FIELDS = {"notes", "ha", "auto_start_action", "auto_start_delay_s",
                   "auto_stop_action", "ha_priority", "anti_affinity", "preferred_hosts"}
RUNNING_FIELDS = {"vcpus", "memory", "dynamic_memory", "resources"} | METADATA_FIELDS


# --- request -> definition fields (shared with the stopped-VM edit) ---------------------------
def merge_settings(data: dict[str, Any], changes: dict[str, Any]) -> None:
    """Turn the nested request parts (dynamic memory, resources) into definition values,
    merged with what the definition has; ``changes`` gets the definition-shaped values."""
    if "dynamic_memory" in changes:
        changes["dynamic_memory"] = _merged_dynamic(data, changes["dynamic_memory"])
        if changes["dynamic_memory"]:
            data["max_memory_bytes"] = max(data["max_memory_bytes"],
                                           changes["dynamic_memory"]["max_bytes"])
    if "resources" in changes:
        given = dict(changes["resources"])
        if "disk_bandwidth_limit" in given:
            given["disk_bandwidth_bytes"] = given.pop("disk_bandwidth_limit")
        changes["resources"] = {**(data.get("resources") or {}), **given}


def _merged_dynamic(data: dict[str, Any], request: dict[str, Any]) -> dict[str, Any] | None:
    if not request.get("enabled", True):
        return None
    current = data.get("dynamic_memory") or {}
    memory = data["memory_bytes"]
    return {"min_bytes": request.get("min", current.get("min_bytes", memory)),
            "max_bytes": request.get("max", current.get("max_bytes",
                                                        max(memory, data["max_memory_bytes"]))),
            "buffer_pct": request.get("buffer_pct", current.get("buffer_pct", 20))}


def refuse_restart_fields(name: str, record: VmRecord, changes: dict[str, Any]) -> None:
    """Fields that change the machine's shape need the VM off; say which."""
    needs_off = sorted(set(changes) - RUNNING_FIELDS)
    dyn_before = record.definition.dynamic_memory is not None
    if "dynamic_memory" in changes and (changes["dynamic_memory"] is not None) != dyn_before:
        needs_off.append("dynamic_memory (turning it on or off)")
    if "memory" in changes and dyn_before:
        raise InvalidInput(f"VM '{name}' uses dynamic memory: change its --min/--max, or "
                           "turn dynamic memory off while it is off", vm=name)
    if needs_off:
        raise StateError(f"change {', '.join(needs_off)} of", record.state.value,
                         [S.OFF.value, S.CRASHED.value], vm=name)


class HotplugManager:
    """Hot-add on running VMs; ``vms`` is the VmManager (store, runtimes, events)."""

    def __init__(self, vms: Any, cgroups: CgroupHost | None = None) -> None:
        self.vms = vms
        self.cgroups = cgroups or CgroupHost.detect()

    # --- vm set ----------------------------------------------------------------------------
    async def edit(self, name: str, request: EditVm) -> VmStatus:
        """``PATCH /vms/NAME``: stopped VMs change their definition; running ones hot-plug."""
        record = self.vms.store.get_vm(name)
        if record.state not in ACTIVE_STATES:
            return self.vms.edit(name, request)
        check_action("hot-plug", record.state, vm=name)
        changes = request.model_dump(exclude_none=True)
        if not changes:
            raise InvalidInput("nothing to change: give at least one setting")
        data = record.definition.model_dump()
        merge_settings(data, changes)
        refuse_restart_fields(name, record, changes)
        runtime = self.vms.runtime(record.uuid)
        async with runtime.exclusive("hot-plug", name):
            await self._apply(self.vms.store.get_vm(name), runtime, changes)
        return self.vms.show(name)

    async def _apply(self, record: VmRecord, runtime: Any, changes: dict[str, Any]) -> None:
        check_action("hot-plug", record.state, vm=record.name)
        target = self._target(record, changes)          # all refusals before any effect
        process = runtime.process
        if target.vcpus != record.definition.vcpus:
            record = await self._set_cpus(record, process, target.vcpus)
        if target.memory_bytes != record.definition.memory_bytes:
            record = await self._set_memory(record, runtime, target.memory_bytes)
        rest = {key: getattr(target, key) for key in
                ("dynamic_memory", "resources", *METADATA_FIELDS)}
        if any(getattr(record.definition, k) != v for k, v in rest.items()):
            if target.resources != record.definition.resources:
                await self.apply_resources(record, process, target.resources, target.vcpus)
            record = self.persist(record, "settings changed", **rest)
            if target.dynamic_memory:
                await self._clamp_balloon(record, runtime)

    def _target(self, record: VmRecord, changes: dict[str, Any]) -> VmDefinition:
        data = record.definition.model_dump()
        for key, value in changes.items():
            data["memory_bytes" if key == "memory" else key] = value
        return validate_model(VmDefinition, data)

    def persist(self, record: VmRecord, what: str, **fields: Any) -> VmRecord:
        """Write confirmed runtime changes to the definition (optimistic concurrency)."""
        data = {**record.definition.model_dump(), **{
            k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in fields.items()}}
        updated = self.vms.store.update_definition(validate_model(VmDefinition, data),
                                                   record.generation)
        self.vms.event("hot-plug", f"{record.name}: {what}", updated,
                       fields=sorted(fields))
        return updated

    # --- processors ---------------------------------------------------------------------------
    async def _set_cpus(self, record: VmRecord, process: Any, target: int) -> VmRecord:
        # Under TCG a vCPU unplug corrupts QEMU 7.2's heap (docs/hot-add.md): refuse it.
        plan = cpu_plan(await qmp_dev.cpu_slots(process), target,
                        allow_remove=self.vms.accelerator.accelerator != "tcg")
        try:
            for slot in plan.add:
                await qmp_dev.add_cpu(process, slot)
            for slot in plan.remove:
                await qmp_dev.remove_cpu(process, slot)
        finally:   # record what QEMU has now, also after a partial failure
            plugged = sum(1 for s in await qmp_dev.cpu_slots(process) if s.qom_path)
            if plugged != record.definition.vcpus:
                record = self.persist(record, f"{record.definition.vcpus} -> {plugged} vCPUs",
                                      vcpus=plugged)
                await self._reapply_cpu_limit(record, process)
        return record

    async def _reapply_cpu_limit(self, record: VmRecord, process: Any) -> None:
        # The limit is a share of the VM's vCPUs: a new count changes the quota.
        resources = record.definition.resources
        if resources.cpu_limit_pct and self.cgroups.available:
            self.cgroups.configure(record.uuid, resources, record.definition.vcpus)

    # --- memory -------------------------------------------------------------------------------
    async def _set_memory(self, record: VmRecord, runtime: Any, target: int) -> VmRecord:
        d, process = record.definition, runtime.process
        base, plugged = await qmp_dev.memory_summary(process)
        if d.memory_hotplug == "virtio-mem":
            state = await qmp_dev.virtio_mem_state(process)
            requested = virtio_mem_request(base=base, region=state["region"],
                                           block=state["block-size"], target=target)
            await qmp_dev.set_virtio_mem(process, requested)
            reached = await qmp_dev.wait_virtio_mem(process, requested, VIRTIO_MEM_SETTLE_S)
            runtime.memory_current_bytes = base + reached
            if reached != requested:
                self.vms.event("warning", f"{record.name}: the guest has {base + reached} of "
                               f"{target} bytes so far (virtio-mem keeps converging)", record)
        else:
            plan = dimm_plan(await qmp_dev.dimms(process), base=base,
                             max_bytes=d.max_memory_bytes, target=target)
            if plan.add_id:
                await qmp_dev.add_dimm(process, plan.add_id, plan.add_size)
            for dimm in plan.remove:
                await qmp_dev.remove_dimm(process, dimm)
            runtime.memory_current_bytes = target
        return self.persist(record, f"memory {d.memory_bytes >> 20} -> {target >> 20} MiB",
                            memory_bytes=target)

    async def _clamp_balloon(self, record: VmRecord, runtime: Any) -> None:
        """New dynamic-memory bounds apply at once; the loop does the rest."""
        dyn = record.definition.dynamic_memory
        actual = await qmp_dev.balloon_actual(runtime.process)
        clamped = max(dyn.min_bytes, min(dyn.max_bytes, actual))
        if clamped != actual:
            await qmp_dev.set_balloon(runtime.process, clamped)
            runtime.memory_current_bytes = clamped

    # --- resource controls ----------------------------------------------------------------------
    async def apply_resources(self, record: VmRecord, process: Any,
                              resources: ResourceControls, vcpus: int) -> None:
        if resources.any_cpu or self.cgroups.available:
            self.cgroups.place(record.uuid, process.pid)
            self.cgroups.configure(record.uuid, resources, vcpus)
        group = f"tg-{record.uuid[:8]}"
        for disk in record.definition.disks:
            if disk.path and disk.media == "disk":
                await qmp_dev.set_io_throttle(
                    process, throttle_arguments(disk_device_id(disk), resources, group))

    # --- lifecycle hooks ------------------------------------------------------------------------
    async def after_launch(self, record: VmRecord, runtime: Any) -> None:
        """QEMU is up: cgroup + limits, disk throttling, balloon at the startup amount."""
        d, process = record.definition, runtime.process
        runtime.memory_current_bytes = d.memory_bytes
        try:
            if self.cgroups.available or d.resources.any_cpu:
                self.cgroups.place(record.uuid, process.pid)
                self.cgroups.configure(record.uuid, d.resources, d.vcpus)
            if d.resources.any_disk:
                await self.apply_resources(record, process, d.resources, d.vcpus)
            if d.dynamic_memory:
                await qmp_dev.enable_guest_stats(process, GUEST_STATS_INTERVAL_S)
                await qmp_dev.set_balloon(process, d.memory_bytes)
        except ParvisorError as exc:    # the VM runs; say loudly what is not enforced
            self.vms.event("error", f"{record.name}: resource controls not applied: "
                           f"{exc.message}", record)

    async def after_adopt(self, record: VmRecord, runtime: Any) -> None:
        """A re-adopted QEMU: put it back under its limits (the cgroup may be new after
        a host reboot of the cgroup tree; QEMU kept its own throttle and balloon)."""
        d = record.definition
        try:
            if self.cgroups.available or d.resources.any_cpu:
                self.cgroups.place(record.uuid, runtime.process.pid)
                self.cgroups.configure(record.uuid, d.resources, d.vcpus)
            if d.dynamic_memory:
                runtime.memory_current_bytes = await qmp_dev.balloon_actual(runtime.process)
        except ParvisorError as exc:
            self.vms.event("error", f"{record.name}: resource controls not re-applied: "
                           f"{exc.message}", record)

    def after_exit(self, record: VmRecord) -> None:
        self.cgroups.remove(record.uuid)
