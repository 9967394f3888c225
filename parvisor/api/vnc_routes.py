"""The graphical console: ``WS /v1/vms/NAME/display`` bridges binary WebSocket frames to
the VM's VNC server (QEMU's ``-vnc unix:<vm dir>/vnc.sock``, see
``parvisor.vm.argv.display_args``). The browser speaks RFB itself (noVNC, page
``/ui/vms/NAME/display``); this side only copies bytes, so there is no VNC code here.

Who may connect is decided in front of the route: on the console listener by
``parvisor.web.guard.ConsoleGuard`` (administrators only, same origin), on the token
listener by ``WebSocketTokenGuard``; the unix socket is trusted (root) like the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI, WebSocket

from parvisor.api.ws_bridge import bridge
from parvisor.errors import ParvisorError
from parvisor.model.states import check_action

PREFIX = "/v1/vms"
CHUNK = 64 << 10          # framebuffer updates are large: read in big pieces
# WebSocket close codes in the private range (4000-4999), shown by the page
CLOSE_UNUSABLE = 4409     # no such VM, or it is not running (no QEMU, no display)
CLOSE_GONE = 4410         # QEMU went away (VM stopped) while connected


def install_vnc_routes(app: FastAPI, service: Any) -> None:
    @app.websocket(f"{PREFIX}/{{name}}/display")
    async def display(websocket: WebSocket, name: str) -> None:
        await attach_display(service, websocket, name)


def display_socket(service: Any, name: str) -> Any:
    """The VNC socket of a VM whose QEMU runs; a ``ParvisorError`` says why not."""
    record = service.store.get_vm(name)
    # the display lives as long as QEMU does: the serial console's states
    check_action("console", record.state, vm=name)
    return service.vms.paths(record.uuid).vnc_socket


async def attach_display(service: Any, websocket: WebSocket, name: str) -> None:
    # accept first so that the reason reaches the page (a refused handshake has none)
    await websocket.accept()
    try:
        reader, writer = await asyncio.open_unix_connection(display_socket(service, name))
    except (ParvisorError, OSError) as exc:
        message = exc.message if isinstance(exc, ParvisorError) else f"no display: {exc}"
        await websocket.close(code=CLOSE_UNUSABLE, reason=message[:120])
        return
    try:
        await bridge(websocket, reader, writer, CHUNK)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_GONE, reason="the VM's display closed")
