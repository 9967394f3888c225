"""Lifecycle actions on VMs: start, shutdown, turn-off, pause, resume, save, restore,
restart, delete, exec; and the watchers that notice what happens on their own
(guest power-off, QEMU crash, heartbeat lost).

Mixed into ``VmManager`` (ops/vms.py), which supplies the store, the runtimes and
``set_state``. Every action: look up, ``check_action`` (refusal changes nothing), take
the VM's exclusive lock (a concurrent action gets 409), then act.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

from parvisor.errors import ParvisorError
from parvisor.guest.agent import GuestAgent
from parvisor.model.states import ACTIVE_STATES, VmState, check_action
from parvisor.ops import disks as disk_ops
from parvisor.ops.jobs import Job
from parvisor.ops.clones import release_template_if_unused
from parvisor.ops.nics import plug_nics, unplug_nics
from parvisor.ops.runtime import VmRuntime, heartbeat_loop
from parvisor.store.base import VmRecord
from parvisor.testing.crashpoints import crashpoint
from parvisor.vm.process import QemuProcess

log = logging.getLogger(__name__)
S = VmState
TURN_OFF_TIMEOUT_S = 5.0


class LifecycleActions:
    # --- start / restore --------------------------------------------------------------
    async def start(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("start", record.state, vm=name)
        if record.state == S.SAVED:
            return {"job": self.restore(name).to_dict()}
        runtime = self.runtime(record.uuid)
        async with runtime.exclusive("start", name):
            # a template with linked clones must not write to its disks (ops.clones)
            record = release_template_if_unused(self, self.store.get_vm(name))
            await self._launch(record, runtime)
        return {"vm": self.show(name).model_dump(mode="json"),
                "warning": self.accelerator.warning}

    async def _launch(self, record: VmRecord, runtime: VmRuntime, *,
                      job: Job | None = None) -> None:
        restoring = record.state == S.SAVED
        record = self.set_state(record, S.STARTING, desired="running")
        try:
            await self._plug_nics(record)
            process = await QemuProcess.launch(
                self._launch_spec(record.definition, incoming=restoring),
                incoming_state=self.paths(record.uuid).saved_state if restoring else None,
                on_event=lambda name, data: self._on_qmp_event(record, name, data))
        except ParvisorError as exc:
            await self._unplug_nics(record)
            back = S.SAVED if restoring else S.OFF
            self.set_state(record, back, f"start failed: {exc.message}")
            self.event("error", f"{record.name}: start failed: {exc.message}", record,
                       **exc.details)
            raise
        if restoring:
            self.paths(record.uuid).saved_state.unlink(missing_ok=True)
        self._attach(record, runtime, process)
        await self.hotplug.after_launch(record, runtime)   # limits, throttle, balloon
        self.set_state(record, S.RUNNING)
        if restoring:
            asyncio.get_running_loop().create_task(self._sync_guest_time(record))

    def restore(self, name: str) -> Job:
        record = self.store.get_vm(name)
        check_action("restore", record.state, vm=name)
        runtime = self.runtime(record.uuid)

        async def work(job: Job) -> dict[str, Any]:
            async with runtime.exclusive("restore", name):
                job.report(0.1, "restoring saved state")
                await self._launch(self.store.get_vm(name), runtime, job=job)
            return self.show(name).model_dump(mode="json")
        if runtime.lock.locked():
            raise self._busy(name, runtime)
        return self.jobs.start("restore", work, vm_name=name)

    # --- stop family ------------------------------------------------------------------
    async def shutdown(self, name: str, timeout_s: float | None = None) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("shutdown", record.state, vm=name)
        runtime = self.runtime(record.uuid)
        async with runtime.exclusive("shutdown", name):
            how = await self._graceful_stop(record, runtime,
                                            timeout_s or self.config.shutdown_timeout_s)
        return {"vm": self.show(name).model_dump(mode="json"), "result": how}

    async def _graceful_stop(self, record: VmRecord, runtime: VmRuntime,
                             timeout_s: float) -> str:
        """Ask the guest to power off; turn it off if it does not within timeout_s."""
        record = self.set_state(record, S.STOPPING, desired="off")
        process, runtime.expecting_exit = runtime.process, True
        if record.state == S.PAUSED:
            await process.resume()
        await self._request_guest_power_off(record, runtime)
        try:
            info = await asyncio.wait_for(process.wait_exited(), timeout_s)
            how = f"guest shut down ({info.reason})"
        except asyncio.TimeoutError:
            await process.stop(timeout=TURN_OFF_TIMEOUT_S)
            how = f"guest did not shut down within {timeout_s:g} s: turned off"
        await self._release(record, runtime)
        self.set_state(record, S.OFF, how)
        return how

    async def _request_guest_power_off(self, record: VmRecord, runtime: VmRuntime) -> None:
        """Guest agent when it answers (works without ACPI support), ACPI button too."""
        if runtime.heartbeat == "ok":
            try:
                await GuestAgent(self.paths(record.uuid).qga_socket).shutdown("powerdown")
            except ParvisorError as exc:
                log.info("%s: guest agent shutdown failed (%s); ACPI only", record.name, exc)
        try:
            await runtime.process.powerdown()
        except ParvisorError as exc:  # QEMU may already be going down
            log.info("%s: system_powerdown: %s", record.name, exc)

    async def turn_off(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("turn-off", record.state, vm=name)
        runtime = self.runtime(record.uuid)
        async with runtime.exclusive("turn-off", name):
            await self._turn_off(self.store.get_vm(name), runtime)
        return {"vm": self.show(name).model_dump(mode="json")}

    async def _turn_off(self, record: VmRecord, runtime: VmRuntime) -> None:
        if record.state == S.SAVED:
            self.paths(record.uuid).saved_state.unlink(missing_ok=True)
            self.set_state(record, S.OFF, "saved state discarded", desired="off")
            return
        if record.state == S.CRASHED:
            self.set_state(record, S.OFF, "cleared after crash", desired="off")
            return
        runtime.expecting_exit = True
        if runtime.process is not None:
            await runtime.process.stop(timeout=TURN_OFF_TIMEOUT_S)
        await self._release(record, runtime)
        self.set_state(record, S.OFF, "turned off", desired="off")

    async def restart(self, name: str, timeout_s: float | None = None) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("restart", record.state, vm=name)
        runtime = self.runtime(record.uuid)
        async with runtime.exclusive("restart", name):
            await self._graceful_stop(record, runtime,
                                      timeout_s or self.config.shutdown_timeout_s)
            await self._launch(self.store.get_vm(name), runtime)
        return {"vm": self.show(name).model_dump(mode="json")}

    # --- pause / resume / save ----------------------------------------------------------
    async def pause(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("pause", record.state, vm=name)
        runtime = self.runtime(record.uuid)
        async with runtime.exclusive("pause", name):
            await runtime.process.pause()
            self.set_state(record, S.PAUSED)
        return {"vm": self.show(name).model_dump(mode="json")}

    async def resume(self, name: str) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("resume", record.state, vm=name)
        runtime = self.runtime(record.uuid)
        async with runtime.exclusive("resume", name):
            await runtime.process.resume()
            self.set_state(record, S.RUNNING)
        asyncio.get_running_loop().create_task(self._sync_guest_time(record))
        return {"vm": self.show(name).model_dump(mode="json")}

    def save(self, name: str) -> Job:
        record = self.store.get_vm(name)
        check_action("save", record.state, vm=name)
        runtime = self.runtime(record.uuid)
        if runtime.lock.locked():
            raise self._busy(name, runtime)

        async def work(job: Job) -> dict[str, Any]:
            async with runtime.exclusive("save", name):
                await self._save(self.store.get_vm(name), runtime, job)
            return self.show(name).model_dump(mode="json")
        return self.jobs.start("save", work, vm_name=name)

    async def _save(self, record: VmRecord, runtime: VmRuntime, job: Job | None) -> None:
        before = record.state
        record = self.set_state(record, S.SAVING)
        runtime.expecting_exit = True
        progress = (lambda fraction: job.report(fraction, "saving memory")) if job else None
        state = self.paths(record.uuid).saved_state
        state.parent.mkdir(parents=True, exist_ok=True)   # a cluster's is on shared storage
        try:
            await runtime.process.save(state, progress)
        except ParvisorError as exc:
            runtime.expecting_exit = False
            self.set_state(record, before, f"save failed: {exc.message}")
            raise
        await self._release(record, runtime)
        self.set_state(record, S.SAVED)

    # --- delete -----------------------------------------------------------------------
    async def delete(self, name: str, force: bool = False) -> dict[str, Any]:
        record = self.store.get_vm(name)
        runtime = self.runtime(record.uuid)
        if record.state in ACTIVE_STATES and not force:
            check_action("delete", record.state, vm=name)
        disk_ops.check_owned_disks_deletable(record.definition,
                                             tuple(self.config.storage_roots))
        async with runtime.exclusive("delete", name):
            record = self.store.get_vm(name)
            if record.state in ACTIVE_STATES:
                await self._turn_off(record, runtime)
            crashpoint("delete.before_store")
            self.store.delete_vm(record.uuid)
            crashpoint("delete.before_files")
            shutil.rmtree(self.paths(record.uuid).root, ignore_errors=True)
            disk_ops.remove_owned_disks(record.definition)   # never user-given disks
            self.runtimes.pop(record.uuid, None)
            self.event("deleted", f"{name}: deleted", record)
        return {"deleted": name}

    # --- exec -------------------------------------------------------------------------
    async def exec(self, name: str, argv: list[str], input_text: str | None,
                   timeout_s: float) -> dict[str, Any]:
        record = self.store.get_vm(name)
        check_action("exec", record.state, vm=name)
        agent = GuestAgent(self.paths(record.uuid).qga_socket)
        data = input_text.encode() if input_text is not None else None
        result = await agent.exec(argv, input=data, timeout=timeout_s)
        return {"exit_code": result.exit_code,
                "stdout": result.stdout.decode(errors="replace"),
                "stderr": result.stderr.decode(errors="replace")}

    # --- watchers -----------------------------------------------------------------------
    def _attach(self, record: VmRecord, runtime: VmRuntime, process: QemuProcess) -> None:
        runtime.process, runtime.expecting_exit = process, False
        runtime.reset_guest_facts()
        runtime.cancel_watchers()
        loop = asyncio.get_running_loop()
        agent = GuestAgent(self.paths(record.uuid).qga_socket)

        async def on_heartbeat(old: str, new: str) -> None:
            if new == "lost":
                self.event("heartbeat", f"{record.name}: guest heartbeat lost", record)
            elif old == "lost":
                self.event("heartbeat", f"{record.name}: guest heartbeat back", record)
        runtime.tasks = [loop.create_task(self._watch_exit(record, runtime, process)),
                         loop.create_task(heartbeat_loop(runtime, agent, on_heartbeat))]

    async def _release(self, record: VmRecord, runtime: VmRuntime) -> None:
        """QEMU is gone: stop watching it and unplug its taps."""
        runtime.cancel_watchers()
        runtime.process = None
        runtime.reset_guest_facts()
        self.hotplug.after_exit(record)          # the (now empty) cgroup
        await self._unplug_nics(record)

    async def _plug_nics(self, record: VmRecord) -> None:
        if record.definition.nics and self.switches is not None:
            await plug_nics(self.switches, record.definition, self._qemu_user())

    async def _unplug_nics(self, record: VmRecord) -> None:
        if record.definition.nics and self.switches is not None:
            try:
                await unplug_nics(self.switches, record.definition)
            except ParvisorError as exc:  # a leftover tap is re-used at the next start
                log.warning("%s: unplugging NICs failed: %s", record.name, exc)

    async def _watch_exit(self, record: VmRecord, runtime: VmRuntime,
                          process: QemuProcess) -> None:
        info = await process.wait_exited()
        if runtime.expecting_exit or runtime.process is not process:
            return  # our own action stopped it and records the state itself
        async with runtime.lock:
            current = self.store.get_vm_by_uuid(record.uuid)
            runtime.process = None      # record the state first: crash noticed < 1 s
            if info.expected:
                self.set_state(current, S.OFF, info.reason, desired="off")
            else:
                self.set_state(current, S.CRASHED, info.reason)
                self.event("error", f"{record.name}: crashed: {info.reason}", current)
            await self._release(record, runtime)

    def _on_qmp_event(self, record: VmRecord, name: str, data: dict[str, Any]) -> None:
        if name in ("SHUTDOWN", "RESET", "POWERDOWN", "GUEST_PANICKED", "BLOCK_IO_ERROR"):
            self.event("qemu", f"{record.name}: QEMU event {name}", record, data=data)

    async def _sync_guest_time(self, record: VmRecord) -> None:
        """After resume/restore the guest clock lags by the time it was stopped."""
        agent = GuestAgent(self.paths(record.uuid).qga_socket)
        for _ in range(10):
            try:
                await agent.set_time()
                return
            except ParvisorError:
                await asyncio.sleep(1)

    @staticmethod
    def _busy(name: str, runtime: VmRuntime) -> ParvisorError:
        from parvisor.errors import Busy
        return Busy(f"VM '{name}' is busy: {runtime.operation} in progress", vm=name,
                    operation=runtime.operation)
