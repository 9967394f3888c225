"""Shared helpers for the benchmark scripts (not a benchmark itself).

``running_service()`` starts ``parvisor host serve`` on a fresh state dir under /tmp
(short, so unix socket paths stay < 108 bytes), with the tiny image copied into
``<state>/images/tiny``, and yields a ``Service`` (pid, state dir, httpx client on the
API socket). On exit it turns off every VM through the API, stops the service by PID,
kills by PID any QEMU the service left behind (checked against its pidfile and argv)
and removes the state dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from parvisor.image.tiny import TinyImage, tiny_image_dir

READY_LINE = b"parvisor-guest: userspace ready"
PARVISOR = Path(sys.executable).with_name("parvisor")


def tiny_image() -> TinyImage:
    try:
        from parvisor.testing.guest_fixtures import tiny_image_for_tests
    except ImportError:  # the shared test fixture is not there: build into the default dir
        from parvisor.image.tiny import build_tiny_image, load_tiny_image
        cache = Path("/var/tmp/parvisor-test-image")
        return load_tiny_image(cache) or build_tiny_image(cache)
    return tiny_image_for_tests()


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` from /proc/PID/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reaps it when it is our child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass
class Service:
    pid: int
    state_dir: Path
    api: httpx.Client

    def call(self, method: str, path: str, **kwargs) -> dict | list:
        response = self.api.request(method, f"/v1{path}", **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()


def _leftover_qemu_pids(state_dir: Path) -> list[int]:
    pids = []
    for pidfile in state_dir.glob("vms/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if pidfile.parent.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


@contextlib.contextmanager
def running_service(*, with_image: bool = True) -> Iterator[Service]:
    state_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
    if with_image:
        shutil.copytree(tiny_image().kernel.parent, tiny_image_dir(state_dir))
    (state_dir / "storage").mkdir()
    log = open(state_dir / "service.log", "wb")
    proc = subprocess.Popen([str(PARVISOR), "host", "serve"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log,
                            env={**os.environ, "PARVISOR_STATE_DIR": str(state_dir)})
    api = httpx.Client(transport=httpx.HTTPTransport(uds=str(state_dir / "run/api.sock")),
                       base_url="http://parvisor", timeout=120)
    service = Service(proc.pid, state_dir, api)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited: {(state_dir / 'service.log').read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if api.get("/v1/vms").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("service did not answer within 60 s")
            time.sleep(0.05)
        yield service
    finally:
        with contextlib.suppress(Exception):
            for vm in service.call("GET", "/vms"):
                if vm["state"] not in ("off", "saved"):
                    with contextlib.suppress(Exception):
                        service.call("POST", f"/vms/{vm['name']}/turn-off")
        api.close()
        kill_pid(proc.pid)
        for pid in _leftover_qemu_pids(state_dir):
            print(f"warning: killing leftover QEMU pid {pid}", file=sys.stderr)
            kill_pid(pid)
        log.close()
        shutil.rmtree(state_dir, ignore_errors=True)
