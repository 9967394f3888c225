"""A small fake QMP server on a real unix socket, for deterministic tests.

It speaks the protocol QEMU speaks: greeting, ``qmp_capabilities``, ``execute`` with
``id`` echoed back, ``{"error": {"class", "desc"}}`` replies, asynchronous events, and
file descriptors passed with SCM_RIGHTS then named by ``getfd``. Tests script it:
replace or add command handlers, emit events, stall a command, hang up.

It serves one client at a time, like a QEMU monitor. It must never pretend to be a
VM beyond what a test asks for: the defaults only cover run state and quit; a test that
needs more adds a handler. The real thing is tested in tests/integration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Handler = Callable[[dict[str, Any]], Any]


class FakeQmpCommandError(Exception):
    """Raise from a handler to send a QMP error reply."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class FakeVmState:
    status: str = "running"
    migration: dict[str, Any] = field(default_factory=lambda: {"status": "none"})

    @property
    def running(self) -> bool:
        return self.status == "running"


def split_json_stream(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Complete JSON objects at the front of ``buffer`` and the unparsed rest.

    QMP clients send objects back to back without newlines (qemu.qmp does), and a
    passed fd arrives with one filler space: parse the stream, not lines.
    """
    decoder = json.JSONDecoder()
    text = buffer.decode()
    messages: list[dict[str, Any]] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return messages, b""
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return messages, text[position:].encode()
        messages.append(value)


class FakeQmpServer:
    """``async with FakeQmpServer(path) as server: ...``"""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        self.vm = FakeVmState()
        self.commands: list[tuple[str, dict[str, Any]]] = []   # what clients executed
        self.fds: dict[str, int] = {}                            # getfd name -> our fd
        self.stalled: set[str] = set()    # commands that never get a reply
        self.handlers: dict[str, Handler] = self._default_handlers()
        self._pending_fds: list[int] = []
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.connections = 0

    # --- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> "FakeQmpServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(4)
        listener.setblocking(False)
        self._listener = listener
        self._serve_task = asyncio.create_task(self._serve())

    async def close(self) -> None:
        if self._serve_task is not None:
            self._serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
        if self._listener is not None:
            self._listener.close()
        self.socket_path.unlink(missing_ok=True)
        for fd in [*self.fds.values(), *self._pending_fds]:
            os.close(fd)
        self.fds.clear()
        self._pending_fds.clear()

    async def wait_connected(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def hang_up(self) -> None:
        """Drop the current client, as a crashing QEMU would."""
        self._drop_connection()

    async def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"event": event, "timestamp": {"seconds": 0,
                                                                 "microseconds": 0}}
        if data is not None:
            message["data"] = data
        await self._send(message)

    def executed(self) -> list[str]:
        return [name for name, _ in self.commands]

    # --- protocol ------------------------------------------------------------------------
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            self._conn = conn
            self.connections += 1
            try:
                await self._session(conn)
            except (ConnectionError, OSError):
                pass
            finally:
                self._close_connection(conn)

    async def _session(self, conn: socket.socket) -> None:
        await self._send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                              "package": "fake"}, "capabilities": ["oob"]}})
        negotiated = False
        buffer = b""
        while True:
            data = await self._recv(conn)
            if not data:
                return
            buffer += data
            messages, buffer = split_json_stream(buffer)
            for message in messages:
                negotiated = await self._on_message(message, negotiated)

    async def _recv(self, conn: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        fileno = conn.fileno()
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 8)
            except BlockingIOError:
                # asyncio has no recvmsg for raw sockets: wait for readability ourselves.
                waiter = loop.create_future()
                loop.add_reader(fileno, waiter.set_result, None)
                try:
                    await waiter
                finally:
                    loop.remove_reader(fileno)
                continue
            self._pending_fds.extend(fds)
            return data

    async def _on_message(self, message: dict[str, Any], negotiated: bool) -> bool:
        command = message.get("execute") or message.get("exec-oob")
        reply_id = message.get("id")
        if command == "qmp_capabilities":
            await self._reply(reply_id, result={})
            return True
        if not negotiated:
            await self._reply(reply_id, error=("CommandNotFound",
                                               "Expecting capabilities negotiation"))
            return False
        arguments = dict(message.get("arguments") or {})
        self.commands.append((str(command), arguments))
        if command in self.stalled:
            return True
        await self._run(str(command), arguments, reply_id)
        return True

    async def _run(self, command: str, arguments: dict[str, Any], reply_id: Any) -> None:
        handler = self.handlers.get(command)
        if handler is None:
            await self._reply(reply_id, error=("CommandNotFound",
                                               f"The command {command} has not been found"))
            return
        try:
            result = handler(arguments)
            if asyncio.iscoroutine(result):
                result = await result
        except FakeQmpCommandError as exc:
            await self._reply(reply_id, error=(exc.error_class, exc.desc))
            return
        await self._reply(reply_id, result={} if result is None else result)
        if command == "quit":
            await self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            self._drop_connection()

    async def _reply(self, reply_id: Any, *, result: Any = None,
                     error: tuple[str, str] | None = None) -> None:
        message: dict[str, Any] = ({"error": {"class": error[0], "desc": error[1]}}
                                   if error else {"return": result})
        if reply_id is not None:
            message["id"] = reply_id
        await self._send(message)

    async def _send(self, message: dict[str, Any]) -> None:
        if self._conn is None:
            raise ConnectionError("no QMP client connected")
        await asyncio.get_running_loop().sock_sendall(self._conn,
                                                      json.dumps(message).encode() + b"\r\n")
        if "QMP" in message:
            self._connected.set()

    def _drop_connection(self) -> None:
        """Shut the client's socket down; the session loop sees EOF and closes it."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
            self._connected.clear()

    def _close_connection(self, conn: socket.socket) -> None:
        self._drop_connection()
        conn.close()
        if self._conn is conn:
            self._conn = None

    # --- default command set ------------------------------------------------------------
    def _default_handlers(self) -> dict[str, Handler]:
        return {
            "query-status": lambda _: {"status": self.vm.status, "running": self.vm.running,
                                       "singlestep": False},
            "stop": lambda _: self._set_status("paused", "STOP"),
            "cont": lambda _: self._set_status("running", "RESUME"),
            "quit": lambda _: None,
            "getfd": self._getfd,
            "closefd": self._closefd,
            "query-migrate": lambda _: dict(self.vm.migration),
        }

    async def _set_status(self, status: str, event: str) -> None:
        # Like QEMU: the STOP/RESUME event goes out before the command's reply.
        self.vm.status = status
        await self.emit(event)

    def _getfd(self, arguments: dict[str, Any]) -> None:
        if not self._pending_fds:
            raise FakeQmpCommandError("No file descriptor supplied via SCM_RIGHTS")
        name = arguments["fdname"]
        if name in self.fds:
            os.close(self.fds[name])
        self.fds[name] = self._pending_fds.pop(0)

    def _closefd(self, arguments: dict[str, Any]) -> None:
        name = arguments["fdname"]
        if name not in self.fds:
            raise FakeQmpCommandError(f"File descriptor named '{name}' not found")
        os.close(self.fds.pop(name))
