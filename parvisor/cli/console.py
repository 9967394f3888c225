"""Interactive serial console over the API's WebSocket; Ctrl-] detaches."""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import unix_connect

from parvisor.config import load_config, state_dir_from_env
from parvisor.cli.main import STATE, err
from parvisor.errors import ServiceUnavailable

DETACH = b"\x1d"  # Ctrl-]


def attach(name: str) -> None:
    socket_path = load_config(state_dir_from_env(STATE["state_dir"])).api_socket
    try:
        ws = unix_connect(str(socket_path), f"ws://parvisor/v1/vms/{name}/console")
    except (OSError, Exception) as exc:  # handshake refusals carry the reason
        raise ServiceUnavailable(f"cannot attach to the console of '{name}': {exc}") from exc
    err.print(f"connected to {name}'s serial console; Ctrl-] to detach", markup=False)
    stop = threading.Event()
    threading.Thread(target=_guest_to_terminal, args=(ws, stop), daemon=True).start()
    is_tty = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if is_tty else None
    try:
        if is_tty:
            tty.setraw(sys.stdin)
        _terminal_to_guest(ws, stop)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        ws.close()
        err.print("\ndetached", markup=False)


def _guest_to_terminal(ws, stop: threading.Event) -> None:
    try:
        for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            os.write(sys.stdout.fileno(), data)
    except ConnectionClosed:
        pass
    stop.set()


def _terminal_to_guest(ws, stop: threading.Event) -> None:
    fd = sys.stdin.fileno()
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        data = os.read(fd, 1024)
        if not data or DETACH in data:
            return
        try:
            ws.send(data)
        except ConnectionClosed:
            return
