"""The graphical console's WebSocket bridge (``parvisor.api.vnc_routes``) against a
real unix socket standing in for QEMU's VNC server, and the token listener's gate for
WebSockets (``WebSocketTokenGuard``). The browser side is in
``tests/integration/test_web_vnc.py``."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from parvisor.api.vnc_routes import CLOSE_UNUSABLE, install_vnc_routes
from parvisor.errors import NotFound
from parvisor.model.states import VmState
from parvisor.web.guard import WebSocketTokenGuard

GREETING = b"RFB 003.008\n"


class FakeVnc:
    """Sends the RFB greeting, then echoes: enough to see bytes cross both ways."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(GREETING)
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)


class FakeService:
    def __init__(self, vm_dir: Path, state: VmState) -> None:
        self.state = state
        self.store = SimpleNamespace(get_vm=self._get_vm)
        self.vms = SimpleNamespace(paths=lambda uuid: SimpleNamespace(
            vnc_socket=vm_dir / "vnc.sock"))

    def _get_vm(self, name: str):
        if name != "vm1":
            raise NotFound(f"no VM named {name!r}")
        return SimpleNamespace(uuid="u-1", state=self.state)


def _client(tmp_path: Path, state: VmState, tokens: tuple[str, ...] | None = None):
    app = FastAPI()
    install_vnc_routes(app, FakeService(tmp_path, state))
    if tokens is not None:
        app.add_middleware(WebSocketTokenGuard, tokens=tokens)
    return TestClient(app)


def test_bytes_cross_both_ways(tmp_path):
    vnc = FakeVnc(tmp_path / "vnc.sock")
    try:
        with _client(tmp_path, VmState.RUNNING).websocket_connect("/v1/vms/vm1/display") as ws:
            assert ws.receive_bytes() == GREETING
            ws.send_bytes(b"\x01\x02client")
            assert ws.receive_bytes() == b"\x01\x02client"
    finally:
        vnc.close()


@pytest.mark.parametrize("name,state,reason", [
    ("vm1", VmState.OFF, "off"),               # no QEMU, no display
    ("nope", VmState.RUNNING, "no VM named"),
    ("vm1", VmState.RUNNING, "no display"),    # QEMU's socket is not there (yet)
])
def test_unusable_display_closes_with_a_reason(tmp_path, name, state, reason):
    with _client(tmp_path, state).websocket_connect(f"/v1/vms/{name}/display") as ws:
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    assert closed.value.code == CLOSE_UNUSABLE
    assert reason in closed.value.reason


def test_token_listener_refuses_websockets_without_the_token(tmp_path):
    vnc = FakeVnc(tmp_path / "vnc.sock")
    try:
        client = _client(tmp_path, VmState.RUNNING, tokens=("tok-123456",))
        for headers in ({}, {"authorization": "Bearer wrong"}):
            with pytest.raises(WebSocketDisconnect) as refused:
                with client.websocket_connect("/v1/vms/vm1/display", headers=headers):
                    pass
            assert refused.value.code == 4401
        with client.websocket_connect("/v1/vms/vm1/display",
                                      headers={"authorization": "Bearer tok-123456"}) as ws:
            assert ws.receive_bytes() == GREETING
    finally:
        vnc.close()
