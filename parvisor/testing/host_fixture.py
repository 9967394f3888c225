"""A real host service for integration tests: ``parvisor host serve`` in a subprocess.

Tests drive it the way a user does, through the CLI (``host.cli(...)``) or the API.
Teardown stops the service and every QEMU it started **by PID** (from the pidfiles in
the state dir), then removes the state dir. Nothing is ever killed by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx

from parvisor.testing.guest_fixtures import pid_alive, short_state_dir, test_image_dir

T = TypeVar("T")
PARVISOR = str(Path(sys.executable).with_name("parvisor"))


def wait_for(condition: Callable[[], T], timeout: float, what: str,
             interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class HostUnderTest:
    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir or short_state_dir("pvh-")
        self.process: subprocess.Popen | None = None
        self.env = {**os.environ, "PARVISOR_STATE_DIR": str(self.state_dir)}
        self.env.pop("PARVISOR_CRASH_AT", None)
        self._link_tiny_image()

    def _link_tiny_image(self) -> None:
        images = self.state_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        source = test_image_dir() / "images" / "tiny"
        if source.is_dir() and not (images / "tiny").exists():
            (images / "tiny").symlink_to(source)

    # --- service process ---------------------------------------------------------------
    def start(self, *, crash_at: str | None = None, timeout: float = 20) -> None:
        env = dict(self.env)
        if crash_at:
            env["PARVISOR_CRASH_AT"] = crash_at
        log = open(self.state_dir / "service.log", "ab")
        self.process = subprocess.Popen([PARVISOR, "host", "serve"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self._answers, timeout, "the host service to answer")

    def _answers(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise AssertionError(f"service exited with {self.process.returncode}:\n"
                                 + self.service_log()[-3000:])
        try:
            return self.api().get("/v1/host").status_code == 200
        except httpx.TransportError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def wait_service_exit(self, timeout: float = 20) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def restart(self) -> None:
        self.kill()
        self.start()

    def service_log(self) -> str:
        path = self.state_dir / "service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- clients -----------------------------------------------------------------------
    def api(self) -> httpx.Client:
        socket_path = self.state_dir / "run" / "api.sock"
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)),
                            base_url="http://parvisor", timeout=120)

    def cli(self, *args: str, check: bool = True, timeout: float = 180,
            input: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([PARVISOR, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"parvisor {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def vm(self, name: str) -> dict[str, Any]:
        return self.json("vm", "show", name)

    def state(self, name: str) -> str:
        return self.vm(name)["state"]

    def vm_dir(self, name: str) -> Path:
        return self.state_dir / "vms" / self.vm(name)["uuid"]

    def console_log(self, name: str) -> str:
        return self.cli("vm", "console", name, "--log", "--tail", "1000000").stdout

    def create_tiny(self, name: str, *extra: str) -> dict[str, Any]:
        return json.loads(self.cli("vm", "create", name, "--image", "tiny", *extra,
                                   "--json").stdout)

    def wait_agent(self, name: str, timeout: float = 60) -> None:
        wait_for(lambda: self.vm(name)["heartbeat"] == "ok", timeout,
                 f"the guest agent of {name}")

    def guest_uptime(self, name: str) -> float:
        return float(self.cli("vm", "exec", name, "--", "cat", "/proc/uptime").stdout.split()[0])

    # --- teardown ----------------------------------------------------------------------
    def qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in (self.state_dir / "vms").glob("*/qemu.pid"):
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def close(self) -> None:
        self.kill()
        for pid in self.qemu_pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not pid_alive(pid), 10, f"QEMU {pid} to exit")
        self._remove_network()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _remove_network(self) -> None:
        """Taps, bridges, nft tables and dnsmasq of this instance's switches (by PID)."""
        database = self.state_dir / "parvisor.db"
        if not database.exists():
            return
        from parvisor.store.sqlite import SqliteStore
        from parvisor.switch import SwitchManager
        store = SqliteStore(database)
        switches = SwitchManager(store, self.state_dir, nic_users=lambda _: [])
        try:
            for record in store.list_vms():
                for nic in record.definition.nics:
                    switches.detach_nic(record.uuid, nic.id)
            for document in store.list_switches():
                switches.delete(document["name"])
        finally:
            switches.close()
            store.close()
