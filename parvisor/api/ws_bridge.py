"""Copy bytes both ways between a browser's WebSocket and a QEMU unix socket.

What for: the serial console (``WS /v1/vms/NAME/console``, the VM's serial chardev) and
the graphical console (``WS /v1/vms/NAME/display``, its VNC server) are both plain byte
streams; the page speaks the protocol (xterm.js, noVNC), this side only relays.
"""

from __future__ import annotations

import asyncio

from fastapi import WebSocket, WebSocketDisconnect


async def bridge(websocket: WebSocket, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, chunk: int = 4096) -> None:
    """Relay until either side ends; the caller closes both afterwards."""
    async def socket_to_browser() -> None:
        while data := await reader.read(chunk):
            await websocket.send_bytes(data)

    async def browser_to_socket() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            writer.write(message.get("bytes") or (message.get("text") or "").encode())
            await writer.drain()

    tasks = [asyncio.create_task(socket_to_browser()), asyncio.create_task(browser_to_socket())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except WebSocketDisconnect:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
