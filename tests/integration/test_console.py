"""The serial console: captured continuously, rotated, and attachable interactively
through the API's WebSocket (what `parvisor vm console NAME` uses)."""

from __future__ import annotations

import time

import pytest
from websockets.sync.client import unix_connect

from parvisor.service import rotate_if_large

pytestmark = pytest.mark.qemu


def test_interactive_console_runs_a_command_in_the_guest_shell(host):
    host.create_tiny("tty")
    host.cli("vm", "start", "tty")
    host.wait_agent("tty")
    socket_path = str(host.state_dir / "run" / "api.sock")
    with unix_connect(socket_path, "ws://parvisor/v1/vms/tty/console") as ws:
        ws.send(b"echo marker-$((6*7))\n")
        seen = b""
        deadline = time.monotonic() + 20
        while b"marker-42" not in seen and time.monotonic() < deadline:
            try:
                seen += ws.recv(timeout=1)
            except TimeoutError:
                pass
    assert b"marker-42" in seen                      # evaluated by the guest's shell
    assert "marker-42" in host.console_log("tty")    # and captured in the log too


def test_console_of_a_stopped_vm_is_refused(host):
    host.create_tiny("quiet")
    socket_path = str(host.state_dir / "run" / "api.sock")
    with pytest.raises(Exception):
        with unix_connect(socket_path, "ws://parvisor/v1/vms/quiet/console") as ws:
            ws.recv(timeout=5)


def test_rotation_keeps_one_generation(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * 100)
    assert not rotate_if_large(log, 200)
    log.write_bytes(b"y" * 300)
    assert rotate_if_large(log, 200)
    assert (tmp_path / "console.log.1").read_bytes() == b"y" * 300
    assert log.stat().st_size == 0
