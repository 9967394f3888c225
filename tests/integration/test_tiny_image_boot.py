"""Build the tiny guest image for real and boot it in QEMU (TCG).

Checks the guest behaviours the rest of parvisor relies on: the first userspace line,
the guest agent on its virtio-serial port (guest-exec), and the orderly power-off
from both the ACPI power button (QMP system_powerdown) and qemu-ga guest-shutdown,
after which QEMU exits by itself.

The .deb cache can be shared between runs with PARVISOR_IMAGE_CACHE=<dir>.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from parvisor.image.tiny import TinyImage, build_tiny_image, load_tiny_image

pytestmark = pytest.mark.qemu

READY = "parvisor-guest: userspace ready"
AGENT_STARTED = "parvisor-guest: guest agent started"
POWERING_OFF = "parvisor-guest: powering off"
BOOT_TIMEOUT = 90.0     # TCG on a loaded 2-core CI machine can be slow
EXIT_TIMEOUT = 60.0


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TinyImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    state_dir = tmp_path_factory.mktemp("tiny-state")
    built = build_tiny_image(state_dir)
    assert load_tiny_image(state_dir) == built
    return built


class Guest:
    """One QEMU process booting the tiny image, with its console log and sockets."""

    def __init__(self, image: TinyImage) -> None:
        # Short dir: unix socket paths are limited to 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="pv-tiny-", dir="/tmp"))
        self.console = self.dir / "console.log"
        self.qga_path = self.dir / "qga.sock"
        self.qmp_path = self.dir / "qmp.sock"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self._argv(image), stdin=subprocess.DEVNULL,
                                     stdout=open(self.dir / "qemu.log", "wb"),
                                     stderr=subprocess.STDOUT)

    def _argv(self, image: TinyImage) -> list[str]:
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-machine", "q35",
            "-m", "256", "-smp", "1", "-nographic", "-nodefaults",
            "-serial", f"file:{self.console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", image.cmdline,
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,path={self.qga_path},server=on,wait=off,id=qga0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, line: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds from QEMU start until `line` showed up on the serial console."""
        def seen() -> bool:
            if self.proc.poll() is not None and line not in self.console_text():
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {line!r}:"
                                     f"\n{self.console_text()[-2000:]}")
            return line in self.console_text()
        wait_for(seen, timeout, repr(line))
        return time.monotonic() - self.started

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()   # by PID, this process only
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def guest(image: TinyImage):
    guests: list[Guest] = []

    def boot() -> Guest:
        g = Guest(image)
        guests.append(g)
        return g

    yield boot
    for g in guests:
        g.stop()


class JsonSocket:
    """Newline-delimited JSON over a unix socket (enough for QMP and qemu-ga)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")

    def send(self, message: dict) -> None:
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()

    def receive(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("socket closed")
        return json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def qmp_connect(path: Path) -> JsonSocket:
    qmp = JsonSocket(path)
    assert "QMP" in qmp.receive()
    qmp.send({"execute": "qmp_capabilities"})
    assert qmp.receive() == {"return": {}}
    return qmp


def qga_connect(path: Path, timeout: float = 30.0) -> JsonSocket:
    """Connect and guest-sync: resend with a fresh id until the agent answers it
    (stale answers to earlier syncs are skipped)."""
    qga = JsonSocket(path, timeout=1.0)
    deadline = time.monotonic() + timeout
    sync_id = int(time.time() * 1000) % 1_000_000
    while time.monotonic() < deadline:
        sync_id += 1
        qga.send({"execute": "guest-sync", "arguments": {"id": sync_id}})
        try:
            while qga.receive().get("return") != sync_id:
                pass
            qga.sock.settimeout(10.0)
            return qga
        except (TimeoutError, socket.timeout):
            continue
    raise AssertionError("qemu-ga did not answer guest-sync")


def qga_call(qga: JsonSocket, command: str, arguments: dict | None = None) -> object:
    message: dict = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    qga.send(message)
    reply = qga.receive()
    assert "return" in reply, reply
    return reply["return"]


def guest_exec(qga: JsonSocket, path: str, *args: str) -> str:
    started = qga_call(qga, "guest-exec",
                       {"path": path, "arg": list(args), "capture-output": True})
    pid = started["pid"]
    status = wait_for(lambda: (s := qga_call(qga, "guest-exec-status", {"pid": pid}))
                      ["exited"] and s, 30, f"guest-exec {path} to finish", 0.1)
    assert status["exitcode"] == 0, status
    return base64.b64decode(status.get("out-data", "")).decode()


def test_boot_and_guest_exec(guest, image: TinyImage) -> None:
    g = guest()
    ready_after = g.wait_console(READY)
    g.wait_console(AGENT_STARTED)
    print(f"\nboot to '{READY}': {ready_after:.2f}s")
    qga = qga_connect(g.qga_path)
    try:
        assert guest_exec(qga, "uname", "-r").strip() == image.kernel_release
        assert guest_exec(qga, "hostname").strip() == "parvisor-tiny"
        assert qga_call(qga, "guest-get-osinfo")["id"] == "parvisor-tiny"
    finally:
        qga.close()
    assert g.console_text().count(READY) == 1


def test_acpi_power_button_powers_off(guest) -> None:
    g = guest()
    # The agent line comes after module loading, i.e. after the button is armed.
    g.wait_console(AGENT_STARTED)
    qmp = qmp_connect(g.qmp_path)
    try:
        qmp.send({"execute": "system_powerdown"})
        g.wait_console(POWERING_OFF, EXIT_TIMEOUT)
        assert g.wait_exit() == 0
    finally:
        qmp.close()


def test_guest_shutdown_via_agent_powers_off(guest) -> None:
    g = guest()
    g.wait_console(AGENT_STARTED)
    qga = qga_connect(g.qga_path)
    try:
        # guest-shutdown has no reply on success: the guest just goes away.
        qga.send({"execute": "guest-shutdown"})
        g.wait_console(POWERING_OFF, EXIT_TIMEOUT)
        assert g.wait_exit() == 0
    finally:
        qga.close()
