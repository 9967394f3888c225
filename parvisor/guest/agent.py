"""Client of the QEMU guest agent (qemu-ga) over the VM's ``qga.sock``.

The guest side is qemu-ga on the virtio-serial port ``org.qemu.guest_agent.0``; the host
side is a QEMU socket chardev that accepts one client at a time. So every call opens a
fresh connection, resynchronises (``guest-sync-delimited`` with a random id: the agent
answers with a 0xFF byte then the id, which skips anything a previous, interrupted
client left in the channel), sends one command, reads its reply and closes. Slower than
a kept-open session by a millisecond; in exchange a stuck or restarted agent never
poisons later calls.

Errors are ``GuestAgentError`` (timeout, disconnect, or the agent's own error message).
This module must never talk QMP to QEMU and never decide VM state: an unanswered ping
is a fact for the heartbeat logic, not a verdict.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from parvisor.errors import GuestAgentError

log = logging.getLogger(__name__)

SENTINEL = b"\xff"
DEFAULT_TIMEOUT = 10.0
SYNC_TIMEOUT = 5.0
READ_LIMIT = 16 << 20             # guest-exec output comes back base64 in one line
EXEC_POLL_START = 0.02
EXEC_POLL_MAX = 0.5
SHUTDOWN_REPLY_WAIT = 5.0


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None          # None when the command was killed by a signal
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    truncated: bool = False        # qemu-ga caps captured output (16 MiB)


@dataclass(frozen=True)
class GuestIpAddress:
    address: str
    prefix: int
    family: Literal["ipv4", "ipv6"]


@dataclass(frozen=True)
class GuestInterface:
    name: str
    hardware_address: str | None
    addresses: tuple[GuestIpAddress, ...] = ()


@dataclass(frozen=True)
class GuestInfo:
    version: str
    supported_commands: tuple[str, ...]


@dataclass(frozen=True)
class GuestOsInfo:
    id: str | None = None
    name: str | None = None
    pretty_name: str | None = None
    version: str | None = None
    version_id: str | None = None
    kernel_release: str | None = None
    kernel_version: str | None = None
    machine: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        known = {k: v for k, v in self.__dict__.items() if k != "extra" and v is not None}
        return {**self.extra, **known}


class GuestAgent:
    """qemu-ga client for one VM; cheap to create, holds no connection between calls."""

    def __init__(self, socket_path: Path, *, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.default_timeout = default_timeout

    # --- public commands ---------------------------------------------------------------
    async def ping(self, *, timeout: float | None = None) -> None:
        await self.call("guest-ping", timeout=timeout)

    async def info(self, *, timeout: float | None = None) -> GuestInfo:
        reply = await self.call("guest-info", timeout=timeout)
        commands = tuple(c["name"] for c in reply.get("supported_commands", [])
                         if c.get("enabled", True))
        return GuestInfo(version=str(reply.get("version", "")), supported_commands=commands)

    async def os_info(self, *, timeout: float | None = None) -> GuestOsInfo:
        reply = dict(await self.call("guest-get-osinfo", timeout=timeout))
        known = {k.replace("-", "_"): reply.pop(k) for k in list(reply)
                 if k.replace("-", "_") in GuestOsInfo.__dataclass_fields__}
        return GuestOsInfo(**known, extra=reply)

    async def network_interfaces(self, *, timeout: float | None = None) -> list[GuestInterface]:
        reply = await self.call("guest-network-get-interfaces", timeout=timeout)
        return [_parse_interface(item) for item in reply]

    async def ip_addresses(self, *, timeout: float | None = None) -> list[str]:
        interfaces = await self.network_interfaces(timeout=timeout)
        return [a.address for i in interfaces for a in i.addresses]

    async def set_time(self, ns: int | None = None, *, timeout: float | None = None) -> None:
        """Set the guest clock to ``ns`` since the epoch, or (None) from its own RTC."""
        await self.call("guest-set-time", {} if ns is None else {"time": ns}, timeout=timeout)

    async def exec(self, argv: list[str], *, input: bytes | None = None,
                   timeout: float) -> ExecResult:
        """Run ``argv`` in the guest (PATH is searched) and return its captured output."""
        if not argv:
            raise ValueError("argv must not be empty")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        started = await self.call("guest-exec", args, timeout=timeout)
        return await self._wait_exec(int(started["pid"]), argv, deadline)

    async def shutdown(self, mode: Literal["powerdown", "reboot", "halt"] = "powerdown", *,
                       timeout: float | None = None) -> None:
        """Ask the guest to power off / reboot.

        qemu-ga sends *no* reply when guest-shutdown succeeds, only an error when it
        fails. So a ``guest-sync`` is sent right behind it: the agent answers in order,
        so getting the sync answer (or a hang-up / silence as the guest goes down) means
        the shutdown was accepted, and an error reply means it was refused.
        """
        timeout = timeout or self.default_timeout
        marker = random.randrange(1, 1 << 31)
        try:
            async with self._session(timeout) as (reader, writer):
                writer.write(_encode("guest-shutdown", {"mode": mode}))
                writer.write(_encode("guest-sync", {"id": marker}))
                await writer.drain()
                reply = await _read_reply(reader, SHUTDOWN_REPLY_WAIT)
        except GuestAgentError as exc:
            if exc.details.get("kind") in ("timeout", "disconnected"):
                return    # the guest is going down and took the agent with it
            raise
        _check_error("guest-shutdown", reply)

    # --- plumbing ----------------------------------------------------------------------
    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float | None = None) -> Any:
        """Run one agent command and return its ``return`` value."""
        timeout = timeout or self.default_timeout
        async with self._session(timeout) as (reader, writer):
            writer.write(_encode(command, arguments))
            await writer.drain()
            reply = await _read_reply(reader, timeout, command)
        _check_error(command, reply)
        return reply.get("return")

    @asynccontextmanager
    async def _session(self, timeout: float) -> AsyncIterator[
            tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        # The agent's chardev serves one client at a time; callers in this process (the
        # heartbeat, `vm exec`, time sync) take turns instead of racing for the socket.
        async with _socket_lock(self.socket_path):
            async with self._connected(timeout) as streams:
                yield streams

    @asynccontextmanager
    async def _connected(self, timeout: float) -> AsyncIterator[
            tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=READ_LIMIT),
                timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise GuestAgentError(f"cannot connect to the guest agent socket"
                                  f" {self.socket_path}: {exc}", kind="disconnected") from exc
        try:
            await _sync(reader, writer, min(timeout, SYNC_TIMEOUT))
            yield reader, writer
        except OSError as exc:  # reset, broken pipe, EINVAL from a chardev going away
            raise GuestAgentError(f"guest agent connection lost: {exc}",
                                  kind="disconnected") from exc
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _wait_exec(self, pid: int, argv: list[str], deadline: float) -> ExecResult:
        loop = asyncio.get_running_loop()
        interval = EXEC_POLL_START
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise GuestAgentError(f"guest command {argv[0]!r} did not finish in time",
                                      kind="timeout", guest_pid=pid, argv=argv)
            status = await self.call("guest-exec-status", {"pid": pid},
                                     timeout=max(left, 1.0))
            if status.get("exited"):
                return _exec_result(status)
            # Backoff: short commands answer in tens of ms, long ones are not hammered.
            await asyncio.sleep(min(interval, max(0.0, deadline - loop.time())))
            interval = min(interval * 2, EXEC_POLL_MAX)


_LOCKS: dict[tuple[int, str], asyncio.Lock] = {}


def _socket_lock(socket_path: Path) -> asyncio.Lock:
    key = (id(asyncio.get_running_loop()), str(socket_path))
    lock = _LOCKS.get(key)
    if lock is None:
        if len(_LOCKS) > 4096:       # VMs come and go; forget idle locks now and then
            for stale in [k for k, v in _LOCKS.items() if not v.locked()]:
                del _LOCKS[stale]
        lock = _LOCKS[key] = asyncio.Lock()
    return lock


# --- wire format ---------------------------------------------------------------------------
def _encode(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return json.dumps(message).encode() + b"\n"


async def _sync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                timeout: float) -> None:
    """Resynchronise: flush the agent's parser (0xFF), then wait for our sync id."""
    sync_id = random.randrange(1, 1 << 31)
    writer.write(SENTINEL + _encode("guest-sync-delimited", {"id": sync_id}))
    await writer.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        # Everything before the agent's 0xFF is stale output from an earlier client.
        await _read_with_deadline(reader.readuntil(SENTINEL), deadline, "guest-sync")
        reply = await _read_reply(reader, max(0.0, deadline - loop.time()), "guest-sync")
        if reply.get("return") == sync_id:
            return


async def _read_with_deadline(awaitable: Any, deadline: float, what: str) -> bytes:
    left = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(awaitable, max(left, 0.0))
    except asyncio.TimeoutError as exc:
        raise GuestAgentError(f"the guest agent did not answer {what} in time"
                              " (not running in the guest?)", kind="timeout") from exc
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise GuestAgentError(f"the guest agent hung up during {what}",
                              kind="disconnected") from exc
    except asyncio.LimitOverrunError as exc:
        raise GuestAgentError(f"the guest agent's reply to {what} is too large",
                              kind="protocol") from exc


async def _read_reply(reader: asyncio.StreamReader, timeout: float,
                      what: str = "command") -> dict[str, Any]:
    """Read the next JSON reply line (blank lines and stray sentinels are skipped)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        line = await _read_with_deadline(reader.readuntil(b"\n"), deadline, what)
        line = line.strip().lstrip(SENTINEL).strip()
        if not line:
            continue
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise GuestAgentError(f"the guest agent sent garbage in reply to {what}",
                                  kind="protocol", line=line[:200].decode(errors="replace")) from exc
        if isinstance(reply, dict):
            return reply


def _check_error(command: str, reply: dict[str, Any]) -> None:
    error = reply.get("error")
    if error:
        desc = error.get("desc", "unknown error")
        raise GuestAgentError(f"guest agent command {command} failed: {desc}",
                              kind="agent", command=command, error_class=error.get("class"))


def _exec_result(status: dict[str, Any]) -> ExecResult:
    return ExecResult(exit_code=status.get("exitcode"),
                      stdout=base64.b64decode(status.get("out-data", "")),
                      stderr=base64.b64decode(status.get("err-data", "")),
                      signal=status.get("signal"),
                      truncated=bool(status.get("out-truncated") or status.get("err-truncated")))


def _parse_interface(item: dict[str, Any]) -> GuestInterface:
    addresses = tuple(
        GuestIpAddress(address=a["ip-address"], prefix=int(a.get("prefix", 0)),
                       family="ipv6" if a.get("ip-address-type") == "ipv6" else "ipv4")
        for a in item.get("ip-addresses", []))
    return GuestInterface(name=item["name"], hardware_address=item.get("hardware-address"),
                          addresses=addresses)
