"""This host's side of the cluster environment: QEMUs through the existing VmManager,
the fencing watchdog, and the saved lease id (``etcd_env.LocalHost``).

What for: the agent runs in its own thread (its keepalives must not wait for the API);
VM starts and stops are coroutines of the service's event loop, so they are handed over
with ``run_coroutine_threadsafe``. A start is waited for briefly (a tiny TCG guest's
QEMU answers QMP in well under a second); a stop is only scheduled, because a graceful
guest shutdown may take a minute and the agent thread must keep renewing the lease.

Never: block the agent thread longer than ``START_WAIT_S``; kill anything but the
recorded PID of a QEMU this service started or adopted; write VM state to the store on
a fence kill (etcd is usually unreachable then, and the cluster status key is the truth).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from parvisor.cluster.env import ClusterVm
from parvisor.cluster.fencing import LocalVm
from parvisor.cluster.watchdog import WatchdogClient
from parvisor.errors import ParvisorError
from parvisor.model.states import VmState
from parvisor.procfs import pid_alive

log = logging.getLogger("parvisor.cluster")
START_WAIT_S = 3.0      # longest the agent thread waits for a QEMU launch (then reports it)


class ServiceLocalHost:
    def __init__(self, vms: Any, loop: asyncio.AbstractEventLoop, lease_file: Path,
                 watchdog: WatchdogClient | None, host: str,
                 incoming: dict[str, Any] | None = None) -> None:
        self.vms = vms                  # ClusterVmManager
        # live-migration targets (uuid -> QemuProcess), kept by the migration coordinator
        self.incoming = incoming if incoming is not None else {}
        self.loop = loop
        self.lease_file = lease_file
        self.watchdog = watchdog
        self.host = host
        self.ha: dict[str, bool] = {}   # uuid -> HA flag, refreshed from every snapshot
        self._lock = threading.Lock()

    def note_vms(self, vms: dict[str, ClusterVm]) -> None:
        with self._lock:
            self.ha = {uuid: vm.ha for uuid, vm in vms.items()}

    def log(self, message: str) -> None:
        log.info("cluster: %s", message)

    # --- processes ------------------------------------------------------------------
    def _pid(self, vm_uuid: str) -> int | None:
        runtime = self.vms.runtimes.get(vm_uuid)
        process = runtime.process if runtime else None
        return process.pid if process is not None and pid_alive(process.pid) else None

    def _incoming_pid(self, vm_uuid: str) -> int | None:
        process = self.incoming.get(vm_uuid)
        return process.pid if process is not None and pid_alive(process.pid) else None

    def local_vms(self) -> list[LocalVm]:
        with self._lock:
            ha = dict(self.ha)
        out = []
        for vm_uuid in list(self.vms.runtimes):
            pid = self._pid(vm_uuid)
            if pid is not None:   # unknown VM: treat as HA, so a fence never spares it
                out.append(LocalVm(vm_uuid, ha.get(vm_uuid, True), pid))
        seen = {vm.uuid for vm in out}
        for vm_uuid, process in list(self.incoming.items()):
            # counted as running here, so after the switch the agent adopts it instead
            # of starting a second QEMU; never an orphan before the switch
            pid = self._incoming_pid(vm_uuid)
            if vm_uuid not in seen and pid is not None:
                out.append(LocalVm(vm_uuid, ha.get(vm_uuid, True), pid, incoming=True))
        return out

    def start_vm(self, vm: ClusterVm) -> None:
        future = asyncio.run_coroutine_threadsafe(self.vms.start_here(vm.uuid), self.loop)
        try:
            future.result(timeout=START_WAIT_S)
        except FutureTimeout:
            log.info("cluster: start of %s still in progress", vm.name)
        except ParvisorError as exc:
            # reported as a crash at the next tick (process absent, status running)
            log.warning("cluster: start of %s failed: %s", vm.name, exc.message)

    def stop_vm(self, vm_uuid: str) -> None:
        asyncio.run_coroutine_threadsafe(self.vms.stop_here(vm_uuid), self.loop)

    def kill_vm(self, vm_uuid: str) -> None:
        """The self-fence: SIGKILL now, from this thread (the event loop may be slow)."""
        runtime = self.vms.runtimes.get(vm_uuid)
        pid = self._pid(vm_uuid)
        incoming = self._incoming_pid(vm_uuid)
        if incoming is not None:       # an incoming migration copy: paused, just kill it
            with contextlib.suppress(ProcessLookupError):
                os.kill(incoming, signal.SIGKILL)
        if runtime is None or pid is None:
            return
        runtime.expecting_exit = True     # not a crash: the watcher must not record one
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        asyncio.run_coroutine_threadsafe(self.vms.forget_killed(vm_uuid), self.loop)

    # --- watchdog and lease ---------------------------------------------------------
    def feed_watchdog(self, deadline: float, vm_uuids: list[str]) -> None:
        if self.watchdog is None:
            return
        pids = [pid for vm_uuid in vm_uuids if (pid := self._pid(vm_uuid)) is not None]
        try:
            self.watchdog.feed(deadline, pids)
        except OSError as exc:
            log.error("cluster: feeding the watchdog failed: %s", exc)

    def save_lease(self, lease_id: int | None) -> None:
        self.lease_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.lease_file.with_suffix(".tmp")
        tmp.write_text("" if lease_id is None else str(lease_id))
        os.replace(tmp, self.lease_file)

    def load_lease(self) -> int | None:
        try:
            text = self.lease_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


def reset_for_takeover(store: Any, vm_uuid: str, host: str) -> None:
    """The record may still say running (written by a host that failed): this host
    owns the VM now and nothing runs here, so the stored state restarts from off."""
    record = store.get_vm_by_uuid(vm_uuid)
    if record.state not in (VmState.OFF, VmState.SAVED):
        store.set_state(vm_uuid, VmState.OFF, f"taken over by host {host}",
                        desired_state="running")
