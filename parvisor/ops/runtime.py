"""What the service knows about a VM while its QEMU lives: the process, the lock that
serialises actions on it, and the watchers (exit monitor, guest heartbeat).

The store holds the durable truth (definition, state); this holds handles that die
with the service process and are rebuilt by reconciliation on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from parvisor.errors import Busy, GuestAgentError
from parvisor.guest.agent import GuestAgent

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 2.0
HEARTBEAT_MISSES_FOR_LOST = 3
GUEST_FACTS_EVERY = 10          # refresh IPs / OS info every N good heartbeats


@dataclass
class VmRuntime:
    vm_uuid: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    operation: str | None = None          # what holds the lock, for Busy messages
    process: Any = None                   # QemuProcess while one exists
    expecting_exit: bool = False          # set by our own stop/save: not a crash
    heartbeat: str = "unknown"            # unknown | ok | lost
    ip_addresses: list[str] = field(default_factory=list)
    os_info: dict[str, Any] | None = None
    memory_current_bytes: int | None = None   # balloon / virtio-mem size (hot-add)
    tasks: list[asyncio.Task] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def exclusive(self, operation: str, vm_name: str):
        """Run one action at a time per VM; a second concurrent action gets 409."""
        if self.lock.locked():
            raise Busy(f"VM '{vm_name}' is busy: {self.operation} in progress",
                       vm=vm_name, operation=self.operation)
        async with self.lock:
            self.operation = operation
            try:
                yield
            finally:
                self.operation = None

    def cancel_watchers(self) -> None:
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.tasks.clear()

    def reset_guest_facts(self) -> None:
        self.heartbeat, self.ip_addresses, self.os_info = "unknown", [], None


async def heartbeat_loop(runtime: VmRuntime, agent: GuestAgent,
                         on_change: Callable[[str, str], Awaitable[None]]) -> None:
    """Ping the guest agent forever; report ok -> lost -> ok changes."""
    misses, good = 0, 0
    while True:
        started = time.monotonic()
        try:
            await asyncio.wait_for(agent.ping(), HEARTBEAT_TIMEOUT_S)
            misses, good = 0, good + 1
            if runtime.heartbeat != "ok":
                old, runtime.heartbeat = runtime.heartbeat, "ok"
                await on_change(old, "ok")
            if good % GUEST_FACTS_EVERY == 1:
                await _refresh_guest_facts(runtime, agent)
        except (GuestAgentError, asyncio.TimeoutError, OSError):
            misses += 1
            if misses >= HEARTBEAT_MISSES_FOR_LOST and runtime.heartbeat == "ok":
                runtime.heartbeat = "lost"
                await on_change("ok", "lost")
        await asyncio.sleep(max(0.0, HEARTBEAT_INTERVAL_S - (time.monotonic() - started)))


async def _refresh_guest_facts(runtime: VmRuntime, agent: GuestAgent) -> None:
    try:
        runtime.ip_addresses = await asyncio.wait_for(agent.ip_addresses(), 5)
        if runtime.os_info is None:
            info = await asyncio.wait_for(agent.os_info(), 5)
            runtime.os_info = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else info
    except (GuestAgentError, asyncio.TimeoutError, OSError) as exc:
        log.debug("guest facts of %s not refreshed: %s", runtime.vm_uuid, exc)
