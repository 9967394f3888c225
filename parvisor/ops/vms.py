"""The VM manager: every VM action, checked then executed (Hyper-V's VMMS).

Each public method is one operation: it validates against the store and the lifecycle
table first (refusals change nothing), then acts through the adapters (QemuProcess,
GuestAgent, the store). API and CLI only translate to and from these methods.
"""

from __future__ import annotations

import logging
import uuid
import pwd
from pathlib import Path
from typing import Any

from parvisor.config import HostConfig
from parvisor.errors import InvalidInput, ParvisorError
from parvisor.hypervisor.probe import AcceleratorChoice
from parvisor.image.tiny import load_tiny_image
from parvisor.model.validation import validate_model
from parvisor.model.states import VmState, check_action, check_transition
from parvisor.model.vm import DiskSpec, DiskBoot, KernelBoot, NicSpec, VmDefinition, VmStatus
from parvisor.ops import disks as disk_ops
from parvisor.ops import vm_media
from parvisor.ops.disk_requests import AttachDisk
from parvisor.ops.hotplug import HotplugManager, merge_settings
from parvisor.ops.hotplug_io import HotplugIo
from parvisor.ops.jobs import JobRegistry
from parvisor.ops.nics import macs_in_use, nic_specs
from parvisor.ops.requests import CreateVm, EditVm, NicRequest
from parvisor.switch import SwitchManager
from parvisor.ops.lifecycle import LifecycleActions
from parvisor.ops.runtime import VmRuntime
from parvisor.storage.qemu_img import inspect_image
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
        self.switches: SwitchManager | None = None   # set by the service
        self._disk_sizes: dict[tuple[str, float], int] = {}
        self.hotplug = HotplugManager(self)      # vm set on running VMs, limits, balloon
        self.hotplug_io = HotplugIo(self.hotplug)  # vm nic|disk add|remove

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
        disk_ops.check_chains_before_start(definition, tuple(self.config.storage_roots))
        return LaunchSpec(definition=definition, paths=self.paths(definition.uuid),
                          accelerator=self.accelerator.accelerator,
                          run_as=self._qemu_user(),
                          buffered_disks=disk_ops.buffered_disk_ids(definition), **extra)

    def _qemu_user(self) -> str | None:
        if not self.config.qemu_user:
            return None
        try:
            pwd.getpwnam(self.config.qemu_user)
            return self.config.qemu_user
        except KeyError:
            return None

    # --- reading ----------------------------------------------------------------------
    def hosts_of_vms(self, records: list[VmRecord]) -> dict[str, str]:
        """uuid -> the host a VM runs on (or is placed on): here, every VM is this host's.
        For list pages: a cluster reads all owner records in one range."""
        return {record.uuid: self.config.host_name for record in records}

    def status(self, record: VmRecord) -> VmStatus:
        d, runtime = record.definition, self.runtimes.get(record.uuid)
        process = runtime.process if runtime else None
        return VmStatus(
            name=d.name, uuid=d.uuid, state=record.state, state_reason=record.state_reason,
            host=self.config.host_name, vcpus=d.vcpus, max_vcpus=d.max_vcpus,
            memory_bytes=d.memory_bytes, max_memory_bytes=d.max_memory_bytes, boot=d.boot,
            memory_hotplug=d.memory_hotplug, dynamic_memory=d.dynamic_memory,
            resources=d.resources,
            memory_current_bytes=(runtime.memory_current_bytes
                                  if runtime and process else None),
            generation=d.generation, secure_boot=d.secure_boot, tpm=d.tpm,
            os_type=d.os_type, boot_order=list(d.boot_order),
            disks=[self._disk_view(disk) for disk in d.disks],
            nics=[nic.model_dump() for nic in d.nics], ha=d.ha,
            ha_priority=d.ha_priority, anti_affinity=d.anti_affinity,
            preferred_hosts=list(d.preferred_hosts),
            auto_start_action=d.auto_start_action, auto_start_delay_s=d.auto_start_delay_s,
            auto_stop_action=d.auto_stop_action, notes=d.notes,
            heartbeat=(runtime.heartbeat if runtime and process else "unknown"),
            ip_addresses=list(runtime.ip_addresses) if runtime and process else [],
            os_info=runtime.os_info if runtime and process else None,
            accelerator=self.accelerator.accelerator,
            pid=process.pid if process else None,
            uptime_s=round(process.uptime_s, 3) if process else None,
            revision=record.generation, template=d.template)

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
        # + the tiny guest's differencing boot disk and the cloud-init seed, if asked for
        definition, media, image = vm_media.plan_for(definition, request, self.config)
        if request.boot_order is not None:       # may name the planned media ("boot")
            definition = validated_definition({**definition.model_dump(),
                                               "boot_order": request.boot_order})
        # The VM's own empty disks appear only together with the record: a refused or
        # failed store write removes them again.
        with disk_ops.created_vm_disks(definition, request.new_disks, self._qemu_user()), \
                vm_media.created(media, image, tuple(self.config.storage_roots)):
            record = self.store.create_vm(definition)
        self.event("created", f"{definition.name}: created", record)
        return self.status(record)

    def _definition_from(self, request: CreateVm) -> VmDefinition:
        vm_uuid = str(uuid.uuid4())     # known up front: the VM's own files live under it
        boot, disks = self._boot_and_disks(request, vm_uuid)
        data = {"name": request.name, "uuid": vm_uuid, "vcpus": request.vcpus, "memory_bytes": request.memory,
                "boot": boot, "disks": disks, "ha": request.ha, "notes": request.notes,
                "nics": self._nic_specs(request.nics),
                "auto_start_action": request.auto_start_action,
                "auto_start_delay_s": request.auto_start_delay_s,
                "auto_stop_action": request.auto_stop_action,
                "ha_priority": request.ha_priority, "anti_affinity": request.anti_affinity,
                "preferred_hosts": tuple(request.preferred_hosts),
                **vm_media.platform_fields(request)}
        if request.max_vcpus:
            data["max_vcpus"] = request.max_vcpus
        if request.max_memory:
            data["max_memory_bytes"] = request.max_memory
        return validated_definition(data)

    def _nic_specs(self, requests: list[NicRequest]) -> list[NicSpec]:
        if not requests:
            return []
        if self.switches is None:
            raise InvalidInput("this host has no switch manager: NICs are not available")
        in_use = macs_in_use(r.definition for r in self.store.list_vms())
        return nic_specs(requests, self.switches, in_use)

    def _boot_and_disks(self, request: CreateVm, vm_uuid: str) -> tuple[Any, list[DiskSpec]]:
        """Boot source + every drive: attached disks first (disk0 boots), then the new
        empty ones, then the CD/DVD drive. Without a kernel the VM boots from them."""
        roots = tuple(self.config.storage_roots)
        attach = ([AttachDisk(path=request.disk)] if request.disk else []) + request.disks
        kernels = [x for x in (request.image, request.kernel) if x]
        if len(kernels) > 1 or not (kernels or attach or request.cdrom):
            raise InvalidInput("give exactly one of --image tiny, --kernel K or --disk PATH"
                               " (or --cdrom ISO to install from)")
        disks = disk_ops.attached_disk_specs(attach, roots)
        disk_ops.check_new_vm_sharing(self.store, disks, getattr(self, "shared_storage", None))
        disks += disk_ops.new_disk_specs(vm_uuid, request.new_disks, len(disks), roots)
        if request.cdrom:
            disks.append(disk_ops.cdrom_spec(request.cdrom, roots))
        if not kernels:
            return DiskBoot(), disks
        return self._kernel_boot(request), disks

    def _kernel_boot(self, request: CreateVm) -> KernelBoot:
        if request.image == "tiny":
            image = load_tiny_image(self.config.state_dir)
            if image is None:
                raise InvalidInput("the tiny image is not built yet: run "
                                   "'parvisor image build-tiny' first")
            return KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd),
                              cmdline=request.cmdline or image.cmdline)
        roots = (*self.config.storage_roots, self.config.state_dir / "images")
        kernel = require_file(resolve_in_roots(request.kernel, roots, what="kernel"),
                              what="kernel")
        initrd = None
        if request.initrd:
            initrd = str(require_file(resolve_in_roots(request.initrd, roots,
                                                       what="initrd"), what="initrd"))
        return KernelBoot(kernel=str(kernel), initrd=initrd,
                          cmdline=request.cmdline or "console=ttyS0")

    def edit(self, name: str, request: EditVm) -> VmStatus:
        record = self.store.get_vm(name)
        check_action("edit", record.state, vm=name)
        changes = request.model_dump(exclude_none=True)
        if not changes:
            raise InvalidInput("nothing to change: give at least one setting")
        data = record.definition.model_dump()
        renames = {"memory": "memory_bytes", "max_memory": "max_memory_bytes"}
        cmdline = changes.pop("cmdline", None)
        merge_settings(data, changes)        # nested dynamic memory / resources
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
    return validate_model(VmDefinition, data)
