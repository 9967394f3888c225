"""The fencing watchdog: a tiny separate process that kills HA VMs when not fed in time.

What for: an agent that is frozen (SIGSTOP, swapped out, stuck in I/O) cannot fence
itself. At every successful keepalive the agent tells this process the self-fence
deadline (CLOCK_MONOTONIC, which is system-wide, so both processes share it) and the
QEMU PIDs to kill. If no newer deadline arrives in time, the watchdog SIGKILLs them.
Proxmox pairs watchdog-mux with a hardware watchdog; here no /dev/watchdog exists.

Protocol: a unix stream socket; one JSON object per line:
``{"deadline": <monotonic s>, "pids": [[pid, start_ticks], ...]}`` arms/re-arms,
``{"disarm": true}`` disarms (clean agent shutdown after stopping its HA VMs). An agent
that disconnects (crashes) leaves the last deadline armed: that is the point.

Never: kill by name, or a PID whose start time (field 22 of /proc/PID/stat) differs
from the one the agent sent (the PID was reused by another process).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from parvisor.errors import InvalidInput


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and ')': split after its last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])      # field 22 overall; fields here start at field 3


@dataclass
class WatchdogState:
    deadline: float | None = None
    targets: list[tuple[int, int]] = field(default_factory=list)

    def apply(self, message: dict) -> None:
        if message.get("disarm"):
            self.deadline, self.targets = None, []
            return
        deadline = message.get("deadline")
        pids = message.get("pids", [])
        if not isinstance(deadline, (int, float)) or not isinstance(pids, list):
            raise InvalidInput("watchdog message needs a deadline and a pid list")
        self.deadline = float(deadline)
        self.targets = [(int(pid), int(start)) for pid, start in pids]


def fire(targets: list[tuple[int, int]]) -> list[int]:
    """SIGKILL each target whose start time still matches; return the PIDs killed."""
    killed = []
    for pid, start in targets:
        if process_start_ticks(pid) != start:
            continue            # gone already, or the PID now belongs to someone else
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def serve(socket_path: Path) -> None:
    state = WatchdogState()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path.unlink(missing_ok=True)
    listener.bind(str(socket_path))
    listener.listen(4)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    buffers: dict[socket.socket, bytes] = {}
    print("watchdog: ready", flush=True)
    while True:
        timeout = None if state.deadline is None else max(0.0, state.deadline - time.monotonic())
        for key, _ in selector.select(timeout):
            if key.fileobj is listener:
                conn, _addr = listener.accept()
                selector.register(conn, selectors.EVENT_READ, None)
                buffers[conn] = b""
            else:
                _read(key.fileobj, selector, buffers, state)    # type: ignore[arg-type]
        if state.deadline is not None and time.monotonic() >= state.deadline:
            killed = fire(state.targets)
            print(f"watchdog: not fed by {state.deadline:.3f}: killed {killed}", flush=True)
            state.deadline, state.targets = None, []


def _read(conn: socket.socket, selector: selectors.BaseSelector,
          buffers: dict[socket.socket, bytes], state: WatchdogState) -> None:
    data = conn.recv(65536)
    if not data:        # the agent went away: keep the deadline armed
        selector.unregister(conn)
        conn.close()
        buffers.pop(conn, None)
        return
    buffers[conn] += data
    *lines, buffers[conn] = buffers[conn].split(b"\n")
    for line in lines:
        try:
            state.apply(json.loads(line))
        except (ValueError, InvalidInput, TypeError) as exc:
            print(f"watchdog: ignored bad message: {exc}", file=sys.stderr, flush=True)


class WatchdogClient:
    """The agent's side: connect once, feed at every successful keepalive."""

    def __init__(self, socket_path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(socket_path))

    def feed(self, deadline: float, pids: list[int]) -> None:
        targets = [[pid, start] for pid in pids
                   if (start := process_start_ticks(pid)) is not None]
        self._send({"deadline": deadline, "pids": targets})

    def disarm(self) -> None:
        self._send({"disarm": True})

    def _send(self, message: dict) -> None:
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="parvisor fencing watchdog")
    parser.add_argument("--socket", required=True, type=Path)
    serve(parser.parse_args(argv).socket)


if __name__ == "__main__":
    main()
