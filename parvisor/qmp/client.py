"""The only place in parvisor that speaks raw QMP.

``QmpConnection`` wraps ``qemu.qmp.QMPClient`` for one QEMU monitor socket: it turns
replies into small typed classes (``RunStatus``, ``MigrationInfo``), maps every library
error to ``parvisor.errors.QmpError`` (the command failed in QEMU) or ``VmError`` (no
connection, connection lost, timeout), and hands QMP events to one callback
``on_event(name, data)`` in the order QEMU sent them.

Everything else (``QemuProcess``, device hot-plug, migration) calls methods here and
never sees a ``qemu.qmp`` object or a raw reply dict. This module must never start or
signal processes, nor decide anything about VM state: it only talks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp import Runstate
from qemu.qmp.message import Message

from parvisor.errors import QmpError, VmError

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]
DEFAULT_COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class RunStatus:
    """Reply of ``query-status``: QEMU's run state (``running``, ``paused``, ...)."""

    status: str
    running: bool

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> "RunStatus":
        return cls(status=str(reply["status"]), running=bool(reply["running"]))


@dataclass(frozen=True)
class MigrationInfo:
    """Reply of ``query-migrate``; byte counts are 0 before RAM transfer starts."""

    status: str
    total_bytes: int = 0
    remaining_bytes: int = 0
    transferred_bytes: int = 0
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    error: str | None = None

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> "MigrationInfo":
        ram = reply.get("ram") or {}
        return cls(status=str(reply.get("status", "none")),
                   total_bytes=int(ram.get("total", 0)),
                   remaining_bytes=int(ram.get("remaining", 0)),
                   transferred_bytes=int(ram.get("transferred", 0)),
                   downtime_ms=reply.get("downtime"),
                   total_time_ms=reply.get("total-time"),
                   error=reply.get("error-desc"))

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"

    @property
    def progress(self) -> float:
        """0.0 .. 1.0, from the RAM counters (the bulk of any migration)."""
        if self.status == "completed":
            return 1.0
        if self.total_bytes <= 0:
            return 0.0
        done = max(0, self.total_bytes - self.remaining_bytes)
        return min(1.0, done / self.total_bytes)


class _Client(QMPClient):
    """QMPClient that delivers events synchronously to one callback.

    Why override the (library-internal, pinned at 0.0.6) dispatcher instead of using an
    ``EventListener``: the default listener keeps every event forever in a queue and a
    history list (a leak for a VM that runs for months), and a listener task would
    deliver events *after* the reader may already have seen the connection close; a
    synchronous call keeps SHUTDOWN strictly before the disconnect.
    """

    def __init__(self, name: str, on_event: EventCallback | None) -> None:
        super().__init__(name)
        self._on_event = on_event

    async def _event_dispatch(self, msg: Message) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(str(msg["event"]), dict(msg.get("data") or {}))
        except Exception:  # a buggy callback must not kill the reader task
            log.exception("QMP event callback failed for %s", msg.get("event"))


class QmpConnection:
    """One QMP session to one QEMU monitor socket."""

    def __init__(self, socket_path: Path, *, on_event: EventCallback | None = None,
                 name: str = "qmp") -> None:
        self.socket_path = Path(socket_path)
        self._client = _Client(name, on_event)

    # --- connection ------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities once; VmError when it does not work."""
        try:
            await asyncio.wait_for(self._client.connect(str(self.socket_path)), timeout)
        except (ConnectError, OSError, asyncio.TimeoutError) as exc:
            await self._reset()
            raise VmError(f"cannot connect to QMP socket {self.socket_path}: {_why(exc)}",
                          socket=str(self.socket_path)) from exc

    async def disconnect(self) -> None:
        """Close the session; errors of a session that already broke are expected."""
        await self._reset()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until the server hangs up (QEMU exited); True when it did in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._client.runstate == Runstate.RUNNING:
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._client.runstate_changed(), left)
            except asyncio.TimeoutError:
                return False
        return True

    async def _reset(self) -> None:
        if self._client.runstate == Runstate.IDLE:
            return
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError) as exc:
            log.debug("QMP disconnect from %s: %s", self.socket_path, _why(exc))

    # --- commands --------------------------------------------------------------------
    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: float = DEFAULT_COMMAND_TIMEOUT) -> Any:
        """Run one command; QmpError if QEMU refused it, VmError if QEMU did not answer."""
        if not self.connected:
            raise VmError(f"QMP command {command} failed: not connected",
                          command=command, socket=str(self.socket_path))
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QmpError(f"QMP command {command} failed: {exc}", command=command,
                           error_class=exc.error_class, qemu_message=str(exc)) from exc
        except asyncio.TimeoutError as exc:
            raise VmError(f"QMP command {command} got no reply within {timeout:g} s",
                          command=command) from exc
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            raise VmError(f"QMP command {command} failed: connection to QEMU lost"
                          f" ({_why(exc)})", command=command) from exc

    async def send_fd(self, fd: int, name: str) -> None:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) and register it as ``name`` (``getfd``).

        The caller keeps (and must close) its own copy of the descriptor.
        """
        if not self.connected:
            raise VmError("QMP command getfd failed: not connected", command="getfd")
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise VmError(f"cannot pass a file descriptor to QEMU: {_why(exc)}",
                          command="getfd") from exc
        await self.execute("getfd", {"fdname": name})

    async def close_fd(self, name: str) -> None:
        await self.execute("closefd", {"fdname": name})

    # --- typed wrappers -----------------------------------------------------------------
    async def query_status(self) -> RunStatus:
        return RunStatus.from_reply(await self.execute("query-status"))

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def system_powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def system_reset(self) -> None:
        await self.execute("system_reset")

    async def quit(self) -> None:
        """Ask QEMU to exit; a connection that drops right after counts as success."""
        try:
            await self.execute("quit")
        except QmpError:
            raise
        except VmError as exc:
            log.debug("QMP quit: connection closed before the reply (%s)", exc.message)

    async def query_migrate(self) -> MigrationInfo:
        return MigrationInfo.from_reply(await self.execute("query-migrate"))

    async def migrate(self, uri: str) -> None:
        await self.execute("migrate", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate_cancel(self) -> None:
        await self.execute("migrate_cancel")

    async def migrate_set_parameters(self, **parameters: Any) -> None:
        """Keyword names use '_' for QMP's '-' (``max_bandwidth`` -> ``max-bandwidth``)."""
        await self.execute("migrate-set-parameters",
                           {k.replace("_", "-"): v for k, v in parameters.items()})


def _why(exc: BaseException) -> str:
    """The most useful text of a (possibly wrapped) qemu.qmp error."""
    inner = getattr(exc, "exc", None)
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if inner is not None and inner is not exc:
        return f"{exc}: {_why(inner)}"
    return str(exc) or type(exc).__name__
