"""This host's hands in a live migration: start the incoming copy, adopt it after the
switch, drop a copy that lost (source after the switch, destination after an abort),
and remove disks that moved away. Mixed into ``ClusterVmManager``; the protocol
(``parvisor.migration.coordinator``) decides when.

Why here: these steps reuse the VM manager's own launch pieces (taps, launch spec,
watchers, resource controls) so an incoming VM is set up exactly like a started one.

Never: attach the incoming QEMU's exit watcher before the switch (its death before the
switch is no crash of the VM, which still runs on the source); write VM state from the
source after the switch (the destination owns the record then).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from parvisor.errors import ParvisorError, StorageError, VmError
from parvisor.hypervisor.probe import probe_host
from parvisor.ops.disks import VM_DISK_DIR
from parvisor.storage.qemu_img import create_image
from parvisor.vm.process import QemuProcess

log = logging.getLogger("parvisor.migration")
QEMU_OVERHEAD_BYTES = 64 << 20       # per VM, beyond guest RAM (TCG code cache, devices)


class MigrationHostActions:
    # --- destination --------------------------------------------------------------------
    async def launch_incoming(self, vm_uuid: str, source_disks: dict[str, int] | None,
                              machine_version: str | None = None
                              ) -> tuple[QemuProcess, dict[str, str]]:
        """QEMU waiting for the stream (``-S -incoming defer``), taps plugged; with
        ``source_disks`` (shared-nothing) new empty images of the same sizes first."""
        record = self.store.get_vm_by_uuid(vm_uuid)
        self._check_room_for(record)
        dest_disks = self._create_target_disks(vm_uuid, source_disks) if source_disks else {}
        definition = with_disk_paths(record.definition, dest_disks)
        here = dataclasses.replace(record, definition=definition)
        try:
            await self._plug_nics(here)
            process = await QemuProcess.launch(self._launch_spec(
                definition, incoming=True, machine_version=machine_version))
        except BaseException:
            await self._unplug_nics(here)
            remove_files(dest_disks)
            raise
        return process, dest_disks

    def _check_room_for(self, record: Any) -> None:
        need = record.definition.memory_bytes + QEMU_OVERHEAD_BYTES
        free = probe_host(self.config.host_name).free_memory_for_vms_bytes
        if free < need:
            raise VmError(f"not enough free memory: the VM needs {need >> 20} MiB, "
                          f"{free >> 20} MiB free for VMs")

    def _create_target_disks(self, vm_uuid: str, sizes: dict[str, int]) -> dict[str, str]:
        directory = self._local_disk_dir(vm_uuid)
        directory.mkdir(parents=True, exist_ok=True)
        made: dict[str, str] = {}
        try:
            for disk_id, size in sorted(sizes.items()):
                path = directory / f"migrated-{disk_id}.qcow2"
                if path.exists():
                    raise StorageError(f"{path} exists already (left by an earlier attempt?)")
                create_image(path, "qcow2", size)
                made[disk_id] = str(path)
        except BaseException:
            remove_files(made)
            raise
        return made

    def _local_disk_dir(self, vm_uuid: str) -> Path:
        """Shared-nothing targets go to the first storage root outside the cluster's
        shared storage (copying onto the same shared files would be pointless)."""
        shared = self.shared_storage.resolve() if self.shared_storage else None
        for root in self.config.storage_roots:
            if shared is None or not Path(root).resolve().is_relative_to(shared):
                return Path(root) / VM_DISK_DIR / vm_uuid
        raise StorageError("this host has no storage root outside the shared storage "
                           "for a shared-nothing migration")

    async def adopt_incoming(self, vm_uuid: str, process: QemuProcess | None,
                             was_running: bool) -> None:
        """After the switch: the VM is this host's. Watch it like a started VM, apply
        its resource controls, and resume the guest (unless it moved paused)."""
        from parvisor.migration import engine
        record = self.store.get_vm_by_uuid(vm_uuid)
        runtime = self.runtime(vm_uuid)
        if process is None:         # this service restarted after the switch
            process = runtime.process or await QemuProcess.adopt(
                self.paths(vm_uuid), vm_uuid,
                on_event=lambda name, data: self._on_qmp_event(record, name, data))
        if process is None:
            raise VmError(f"the incoming QEMU of {record.name} is gone after the switch")
        if runtime.process is not process:
            self._attach(record, runtime, process)
        await engine.resume_incoming(process, start=was_running)   # checks the state arrived
        await self.hotplug.after_launch(record, runtime)
        self.store.set_state(vm_uuid, record.state, f"migrated to {self.config.host_name}")

    async def drop_incoming(self, vm_uuid: str, process: QemuProcess | None,
                            dest_disks: dict[str, str]) -> None:
        """An aborted migration: quit the incoming copy, unplug its taps, remove the disk
        files made for it. When the VM is this host's meanwhile (e.g. it failed over
        here later), only the incoming process we hold and the new files go: the QEMU
        the runtime watches and its taps are the VM's own."""
        from parvisor.migration import engine
        owner, _ = self._cluster_doc("owner", vm_uuid)
        here = self.migrations.host if self.migrations is not None else self.config.host_name
        ours = owner is not None and owner.get("host") == here
        runtime = self.runtimes.get(vm_uuid)
        if process is None and not ours:
            if runtime is not None and runtime.process is not None:
                # this service restarted and adopted the incoming copy as the VM's
                process = runtime.process
                runtime.expecting_exit = True
            else:
                process = await QemuProcess.adopt(self.paths(vm_uuid), vm_uuid)
        if process is not None:
            try:
                await engine.abort_incoming(process)
            except ParvisorError as exc:
                log.warning("aborting the incoming copy of %s: %s", vm_uuid, exc.message)
                await process.stop()
        if runtime is not None and runtime.process is process and process is not None:
            runtime.cancel_watchers()
            runtime.process = None
        if not ours:
            await self._unplug_nics(self.store.get_vm_by_uuid(vm_uuid))
        remove_files(dest_disks)

    # --- source ---------------------------------------------------------------------
    async def drop_migrated_copy(self, vm_uuid: str) -> None:
        """After the switch: quit the paused source copy; no state is written (the
        destination owns the record now)."""
        runtime = self.runtimes.get(vm_uuid)
        if runtime is None or runtime.process is None:
            return
        runtime.expecting_exit = True
        process = runtime.process
        try:
            await process.quit()
            await process.wait_exited()
        except ParvisorError:
            await process.stop()
        record = self.store.get_vm_by_uuid(vm_uuid)
        runtime.cancel_watchers()
        runtime.process = None
        runtime.reset_guest_facts()
        self.hotplug.after_exit(record)
        await self._unplug_nics(record)
        shutil.rmtree(self.paths(vm_uuid).root, ignore_errors=True)

    @staticmethod
    def remove_moved_disks(paths: dict[str, str]) -> None:
        """Shared-nothing, after the destination runs: the source's files of the moved
        disks that parvisor owns (user-given files are never deleted)."""
        remove_files(paths)


def with_disk_paths(definition: Any, paths: dict[str, str]) -> Any:
    if not paths:
        return definition
    disks = [d.model_copy(update={"path": paths[d.id], "owned": True}) if d.id in paths else d
             for d in definition.disks]
    return definition.model_copy(update={"disks": disks})


def remove_files(paths: dict[str, str]) -> None:
    """Remove the files and then their directories if that left them empty."""
    for path in paths.values():
        Path(path).unlink(missing_ok=True)
    for directory in {Path(path).parent for path in paths.values()}:
        try:
            directory.rmdir()
        except OSError:
            pass        # not empty (other disks of the VM) or gone already
