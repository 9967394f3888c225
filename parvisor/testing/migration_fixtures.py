"""Helpers for live-migration tests and the migration benchmark: two QEMUs of one VM on
this host (each with its own state dir, same uuid), a guest workload that dirties
memory and logs timestamps, and a TCP relay that records what crosses the link.

Every QEMU started through ``QemuSet`` is stopped by PID in ``close`` (tests call it in
a ``finally``); nothing here kills by name.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from parvisor.guest.agent import GuestAgent
from parvisor.image.tiny import TinyImage
from parvisor.model.vm import VmDefinition
from parvisor.vm.argv import LaunchSpec
from parvisor.vm.paths import VmPaths
from parvisor.vm.process import QemuProcess, is_qemu_for
from parvisor.testing.guest_fixtures import short_state_dir, wait_until

READY = "parvisor-guest: userspace ready"
BOOT_TIMEOUT_S = 90.0
AGENT_TIMEOUT_S = 60.0

# Runs detached in the guest (stdio to /dev/null so guest-exec returns at once):
# a loop rewriting DIRTY_MIB of tmpfs with non-zero data (zero pages would migrate for
# free) and a 10 ms loop appending "counter uptime" lines to /tmp/ts. The uptime comes
# from /proc/uptime through the shell's builtin read (no fork; busybox date has no %N),
# so timestamps have 10 ms resolution.
WORKLOAD = r"""
dd if=/dev/urandom of=/tmp/src bs=1M count=4 2>/dev/null
n=$(( {dirty_mib} / 4 ))
i=0; while [ $i -lt $n ]; do cat /tmp/src; i=$((i+1)); done > /tmp/dirty
setsid sh -c 'while :; do i=0; while [ $i -lt '$n' ]; do
  dd if=/tmp/src of=/tmp/dirty bs=1M seek=$((i*4)) conv=notrunc 2>/dev/null; i=$((i+1));
done; done' </dev/null >/dev/null 2>&1 &
setsid sh -c 'c=0; while :; do c=$((c+1)); read up idle < /proc/uptime;
  echo "$c $up" >> /tmp/ts; usleep 10000; done' </dev/null >/dev/null 2>&1 &
echo started
"""


def tiny_definition(image: TinyImage, *, name: str = "mig", memory: str = "192M",
                    disks: tuple[dict[str, Any], ...] = ()) -> VmDefinition:
    return VmDefinition.model_validate({
        "name": name, "memory_bytes": memory, "disks": list(disks),
        "boot": {"kind": "kernel", "kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": image.cmdline}})


class QemuSet:
    """The QEMUs of one test: each in its own state dir; stopped by PID at ``close``."""

    def __init__(self) -> None:
        self.procs: list[QemuProcess] = []
        self.dirs: list[Path] = []

    def spec(self, definition: VmDefinition, *, incoming: bool = False) -> LaunchSpec:
        state = short_state_dir("pvm-")
        self.dirs.append(state)
        return LaunchSpec(definition=definition, paths=VmPaths(state, definition.uuid),
                          accelerator="tcg", incoming=incoming)

    async def boot(self, definition: VmDefinition) -> tuple[QemuProcess, GuestAgent]:
        spec = self.spec(definition)
        proc = await self.launch(spec)
        log = spec.paths.console_log
        await wait_until(lambda: log.exists() and READY in log.read_text(errors="replace"),
                         BOOT_TIMEOUT_S, "the guest's userspace")
        agent = GuestAgent(spec.paths.qga_socket)
        await wait_for_agent(agent)
        return proc, agent

    async def incoming(self, definition: VmDefinition) -> QemuProcess:
        return await self.launch(self.spec(definition, incoming=True))

    async def launch(self, spec: LaunchSpec) -> QemuProcess:
        proc = await QemuProcess.launch(spec)
        self.procs.append(proc)
        return proc

    async def stop(self, proc: QemuProcess) -> None:
        if not proc.exited and not proc.detached:
            try:
                await proc.stop(timeout=5)
            except Exception:
                pass
        if is_qemu_for(proc.pid, proc.vm_uuid) and not proc.exited:
            os.kill(proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        for proc in self.procs:
            await self.stop(proc)
        for directory in self.dirs:
            shutil.rmtree(directory, ignore_errors=True)


async def wait_for_agent(agent: GuestAgent, timeout: float = AGENT_TIMEOUT_S) -> None:
    async def answers() -> bool:
        try:
            await agent.ping(timeout=2)
            return True
        except Exception:
            return False
    await wait_until(answers, timeout, "the guest agent", interval=0.2)


async def sh(agent: GuestAgent, script: str, timeout: float = 60) -> str:
    """Run a shell script in the guest; its stdout (AssertionError when it fails)."""
    done = await agent.exec(["sh", "-c", script], timeout=timeout)
    if done.exit_code != 0:
        raise AssertionError(f"guest command failed ({done.exit_code}): {script!r}: "
                             f"{done.stderr.decode(errors='replace')}")
    return done.stdout.decode(errors="replace")


async def start_workload(agent: GuestAgent, dirty_mib: int = 32) -> None:
    out = await sh(agent, WORKLOAD.replace("{dirty_mib}", str(dirty_mib)), timeout=120)
    assert "started" in out


async def counter(agent: GuestAgent) -> int:
    """The workload's counter (last complete line of /tmp/ts)."""
    out = await sh(agent, "tail -n 2 /tmp/ts 2>/dev/null; true")
    lines = [ln.split() for ln in out.splitlines() if len(ln.split()) == 2]
    return int(lines[-1][0]) if lines else 0


async def guest_uptime(agent: GuestAgent) -> float:
    return float((await sh(agent, "cat /proc/uptime")).split()[0])


async def timestamp_gaps(agent: GuestAgent) -> list[tuple[int, float]]:
    """(counter, gap in ms before that line) for every line of /tmp/ts."""
    rows = await timestamp_log(agent)
    return [(c2, (t2 - t1) * 1000) for (_, t1), (c2, t2) in zip(rows, rows[1:])]


async def timestamp_log(agent: GuestAgent) -> list[tuple[int, float]]:
    """(counter, guest uptime in s) for every complete line of /tmp/ts."""
    out = await sh(agent, "cat /tmp/ts", timeout=60)
    rows: list[tuple[int, float]] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            try:
                rows.append((int(parts[0]), float(parts[1])))
            except ValueError:
                continue    # a line cut short by a concurrent write
    return rows


class TcpRelay:
    """Forward one TCP port to another, recording the bytes sent client -> server
    (and counting the other direction); for inspecting a migration stream."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.upstream = bytearray()
        self.downstream_bytes = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> int:
        self._server = await asyncio.start_server(self._serve, host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        forward = asyncio.ensure_future(self._pipe(reader, up_writer, record=True))
        backward = asyncio.ensure_future(self._pipe(up_reader, writer, record=False))
        self._tasks |= {forward, backward}
        await asyncio.gather(forward, backward, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    record: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if record:
                    self.upstream += data
                else:
                    self.downstream_bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except OSError:
                pass

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
