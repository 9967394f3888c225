"""The host service's dynamic memory loop: gather, decide (pure policy), apply.

Every ``interval`` seconds: for each running VM with dynamic memory, read its balloon
size and the guest's statistics over QMP; read the host's available memory; let
``dynamic_memory.decide_targets`` choose; set the new balloon targets. A VM whose
QMP fails is skipped this round (logged), never the whole loop.

The interval is ``$PARVISOR_DYNAMIC_MEMORY_INTERVAL_S`` (default 5 s; tests use less).
This module never decides targets itself and never touches the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from parvisor.errors import ParvisorError
from parvisor.model.states import VmState
from parvisor.ops import hotplug_devices as qmp_dev
from parvisor.ops.dynamic_memory import GuestMemory, PolicySettings, decide_targets

log = logging.getLogger(__name__)
INTERVAL_ENV = "PARVISOR_DYNAMIC_MEMORY_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0


def loop_interval() -> float:
    try:
        return max(0.2, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


async def _observe(record: Any, process: Any) -> GuestMemory:
    dyn = record.definition.dynamic_memory
    actual = await qmp_dev.balloon_actual(process)
    stats = await qmp_dev.guest_stats(process)
    return GuestMemory(record.uuid, dyn.min_bytes, dyn.max_bytes, dyn.buffer_pct, actual,
                       stats.get("stat-total-memory"), stats.get("stat-available-memory"))


async def balance_once(vms: Any, settings: PolicySettings = PolicySettings()) -> dict[str, int]:
    """One round; returns the targets it set (uuid -> bytes)."""
    observed, processes = [], {}
    for record in vms.store.list_vms():
        runtime = vms.runtimes.get(record.uuid)
        if (record.state != VmState.RUNNING or not record.definition.dynamic_memory
                or runtime is None or runtime.process is None):
            continue
        try:
            observed.append(await _observe(record, runtime.process))
            processes[record.uuid] = runtime
        except ParvisorError as exc:
            log.info("dynamic memory: %s skipped: %s", record.name, exc.message)
    if not observed:
        return {}
    targets = decide_targets(observed, host_available_bytes(), settings)
    for vm_uuid, target in targets.items():
        runtime = processes[vm_uuid]
        try:
            await qmp_dev.set_balloon(runtime.process, target)
            runtime.memory_current_bytes = target
        except ParvisorError as exc:
            log.info("dynamic memory: balloon of %s not set: %s", vm_uuid, exc.message)
    return targets


async def dynamic_memory_loop(vms: Any, interval: float | None = None) -> None:
    interval = interval or loop_interval()
    while True:
        try:
            await balance_once(vms)
        except Exception:      # one bad round must not end dynamic memory for good
            log.exception("dynamic memory round failed")
        await asyncio.sleep(interval)
