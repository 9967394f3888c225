"""The VM manager: every VM action, checked then executed (Hyper-V's VMMS).

Each public method is one operation: it validates against the store and the lifecycle
table first (refusals change nothing), then acts through the adapters (QemuProcess,
GuestAgent, the store). API and CLI only translate to and from these methods.
"""

from __future__ import annotations

import logging
import pwd
from pathlib import Path
from typing import Any

from parvisor.config import HostConfig
from parvisor.errors import InvalidInput, ParvisorError
from parvisor.hypervisor.probe import AcceleratorChoice
from parvisor.image.tiny import load_tiny_image
from parvisor.model.states import VmState, check_action, check_transition
from parvisor.model.vm import DiskSpec, DiskBoot, KernelBoot, VmDefinition, VmStatus
from parvisor.ops.jobs import JobRegistry
from parvisor.ops.requests import CreateVm, EditVm
from parvisor.ops.lifecycle import LifecycleActions
from parvisor.ops.runtime import VmRuntime
from parvisor.storage.qemu_img import guess_format, inspect_image
from parvisor.storage.roots import require_file, resolve_in_roots
from parvisor.store.base import Event, Store, VmRecord
from parvisor.vm.argv import LaunchSpec
from parvisor.vm.paths import VmPaths

log = logging.getLogger(__name__)
S = VmState


class VmManager(LifecycleActions):
    def __init__(self, config: HostConfig, store: Store, jobs: JobRegistry,
                 accelerator: AcceleratorChoice) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs
        self.accelerator = accelerator
        self.runtimes: dict[str, VmRuntime] = {}
        self._disk_sizes: dict[tuple[str, float], int] = {}

    # --- helpers ----------------------------------------------------------------------
    def paths(self, vm_uuid: str) -> VmPaths:
        return VmPaths(self.config.state_dir, vm_uuid)

    def runtime(self, vm_uuid: str) -> VmRuntime:
        return self.runtimes.setdefault(vm_uuid, VmRuntime(vm_uuid))

    def event(self, kind: str, message: str, record: VmRecord | None = None,
              **details: Any) -> None:
        self.store.append_event(Event(kind, message, record.name if record else None,
                                      record.uuid if record else None, details))

    def set_state(self, record: VmRecord, target: VmState, reason: str = "", *,
                  desired: str | None = None) -> VmRecord:
        current = self.store.get_vm_by_uuid(record.uuid)
        check_transition(current.state, target, vm=record.name)
        updated = self.store.set_state(record.uuid, target, reason, desired_state=desired)
        self.event("state", f"{record.name}: {current.state} -> {target}"
                   + (f" ({reason})" if reason else ""), record,
                   old=current.state.value, new=target.value, reason=reason)
        return updated

    def _launch_spec(self, definition: VmDefinition, **extra: Any) -> LaunchSpec:
        return LaunchSpec(definition=definition, paths=self.paths(definition.uuid),
                          accelerator=self.accelerator.accelerator,
                          run_as=self._qemu_user(), **extra)

    def _qemu_user(self) -> str | None:
        if not self.config.qemu_user:
            return None
        try:
            pwd.getpwnam(self.config.qemu_user)
            return self.config.qemu_user
        except KeyError:
            return None

    # --- reading ----------------------------------------------------------------------
    def status(self, record: VmRecord) -> VmStatus:
        d, runtime = record.definition, self.runtimes.get(record.uuid)
        process = runtime.process if runtime else None
        return VmStatus(
            name=d.name, uuid=d.uuid, state=record.state, state_reason=record.state_reason,
            host=self.config.host_name, vcpus=d.vcpus, max_vcpus=d.max_vcpus,
            memory_bytes=d.memory_bytes, max_memory_bytes=d.max_memory_bytes, boot=d.boot,
            generation=d.generation, secure_boot=d.secure_boot, tpm=d.tpm,
            os_type=d.os_type, boot_order=list(d.boot_order),
            disks=[self._disk_view(disk) for disk in d.disks],
            nics=[nic.model_dump() for nic in d.nics], ha=d.ha,
            auto_start_action=d.auto_start_action, auto_start_delay_s=d.auto_start_delay_s,
            auto_stop_action=d.auto_stop_action, notes=d.notes,
            heartbeat=(runtime.heartbeat if runtime and process else "unknown"),
            ip_addresses=list(runtime.ip_addresses) if runtime and process else [],
            os_info=runtime.os_info if runtime and process else None,
            accelerator=self.accelerator.accelerator,
            pid=process.pid if process else None,
            uptime_s=round(process.uptime_s, 3) if process else None,
            revision=record.generation)

    def _disk_view(self, disk: DiskSpec) -> dict[str, Any]:
        view = disk.model_dump()
        if disk.path is None:
            return {**view, "size_bytes": None}
        try:
            mtime = Path(disk.path).stat().st_mtime
            key = (disk.path, mtime)
            if key not in self._disk_sizes:
                self._disk_sizes[key] = inspect_image(Path(disk.path), disk.format).virtual_size
            view["size_bytes"] = self._disk_sizes[key]
        except (OSError, ParvisorError):
            view["size_bytes"] = None
        return view

    def list(self) -> list[VmStatus]:
        return [self.status(record) for record in self.store.list_vms()]

    def show(self, name: str) -> VmStatus:
        return self.status(self.store.get_vm(name))

    # --- definitions ------------------------------------------------------------------
    def create(self, request: CreateVm) -> VmStatus:
        definition = self._definition_from(request)
        record = self.store.create_vm(definition)
        self.event("created", f"{definition.name}: created", record)
        return self.status(record)

    def _definition_from(self, request: CreateVm) -> VmDefinition:
        boot, disks = self._boot_and_disks(request)
        data = {"name": request.name, "vcpus": request.vcpus, "memory_bytes": request.memory,
                "boot": boot, "disks": disks, "ha": request.ha, "notes": request.notes,
                "auto_start_action": request.auto_start_action,
                "auto_start_delay_s": request.auto_start_delay_s,
                "auto_stop_action": request.auto_stop_action}
        if request.max_vcpus:
            data["max_vcpus"] = request.max_vcpus
        if request.max_memory:
            data["max_memory_bytes"] = request.max_memory
        return validated_definition(data)

    def _boot_and_disks(self, request: CreateVm) -> tuple[Any, list[DiskSpec]]:
        sources = [x for x in (request.image, request.kernel, request.disk) if x]
        if len(sources) != 1:
            raise InvalidInput("give exactly one of --image tiny, --kernel K or --disk PATH")
        if request.image == "tiny":
            image = load_tiny_image(self.config.state_dir)
            if image is None:
                raise InvalidInput("the tiny image is not built yet: run "
                                   "'parvisor image build-tiny' first")
            return KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd),
                              cmdline=request.cmdline or image.cmdline), []
        if request.kernel:
            roots = (*self.config.storage_roots, self.config.state_dir / "images")
            kernel = require_file(resolve_in_roots(request.kernel, roots, what="kernel"),
                                  what="kernel")
            initrd = None
            if request.initrd:
                initrd = str(require_file(resolve_in_roots(request.initrd, roots,
                                                           what="initrd"), what="initrd"))
            return KernelBoot(kernel=str(kernel), initrd=initrd,
                              cmdline=request.cmdline or "console=ttyS0"), []
        disk_path = require_file(resolve_in_roots(request.disk, self.config.storage_roots),
                                 what="disk")
        return DiskBoot(), [DiskSpec(id="disk0", path=str(disk_path),
                                     format=guess_format(disk_path))]

    def edit(self, name: str, request: EditVm) -> VmStatus:
        record = self.store.get_vm(name)
        check_action("edit", record.state, vm=name)
        changes = request.model_dump(exclude_none=True)
        if not changes:
            raise InvalidInput("nothing to change: give at least one setting")
        data = record.definition.model_dump()
        renames = {"memory": "memory_bytes", "max_memory": "max_memory_bytes"}
        cmdline = changes.pop("cmdline", None)
        for key, value in changes.items():
            data[renames.get(key, key)] = value
        if "memory" in changes and "max_memory" not in changes:
            data["max_memory_bytes"] = max(data["max_memory_bytes"], data["memory_bytes"])
        if "vcpus" in changes and "max_vcpus" not in changes:
            data["max_vcpus"] = max(data["max_vcpus"], data["vcpus"])
        if cmdline is not None:
            if data["boot"]["kind"] != "kernel":
                raise InvalidInput("--cmdline applies only to VMs that boot a kernel")
            data["boot"]["cmdline"] = cmdline
        updated = self.store.update_definition(validated_definition(data), record.generation)
        self.event("edited", f"{name}: definition changed ({', '.join(sorted(changes))})",
                   updated, changes=changes)
        return self.status(updated)


def validated_definition(data: dict[str, Any]) -> VmDefinition:
    """Build a definition, turning pydantic's errors into one readable InvalidInput."""
    from pydantic import ValidationError
    try:
        return VmDefinition.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidInput(f"{where}: {message}" if where else message,
                           errors=[{"field": ".".join(map(str, e["loc"])), "message": e["msg"]}
                                   for e in exc.errors()]) from None
