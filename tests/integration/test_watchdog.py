"""The fencing watchdog as a real process: it kills a real process by PID when not fed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parvisor.cluster.watchdog import WatchdogClient, process_start_ticks

KILL_MARGIN_S = 0.5     # stated margin: the kill lands within this after the deadline


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def gone(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


@pytest.fixture
def watchdog(tmp_path: Path):
    sock = tmp_path / "wd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "parvisor.cluster.watchdog",
                             "--socket", str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "watchdog: ready"
        client = WatchdogClient(sock)
        yield proc, client
        client.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture
def victim():
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


def test_unfed_watchdog_kills_by_pid_before_deadline_plus_margin(watchdog, victim):
    _proc, client = watchdog
    deadline = time.monotonic() + 0.8
    client.feed(deadline, [victim.pid])
    # stop feeding: the victim must die at the deadline, not before, not much after
    wait_for(lambda: gone(victim), 0.8 + KILL_MARGIN_S + 1.0, "the victim to die")
    died = time.monotonic()
    assert deadline - 0.05 <= died <= deadline + KILL_MARGIN_S, (died - deadline)
    assert victim.returncode == -signal.SIGKILL


def test_fed_watchdog_kills_nothing(watchdog, victim):
    _proc, client = watchdog
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        client.feed(time.monotonic() + 0.4, [victim.pid])
        time.sleep(0.1)         # the feeding interval itself, not a wait for a result
    client.disarm()
    assert victim.poll() is None


def test_agent_disconnect_keeps_deadline_armed(tmp_path, watchdog, victim):
    proc, client = watchdog
    second = WatchdogClient(tmp_path / "wd.sock")
    second.feed(time.monotonic() + 0.5, [victim.pid])
    second.close()              # the agent crashed
    wait_for(lambda: gone(victim), 2.0, "the victim to die after the agent vanished")
    assert proc.poll() is None  # the watchdog itself lives on


def test_reused_pid_is_not_killed(watchdog, victim):
    proc, client = watchdog
    start = process_start_ticks(victim.pid)
    assert start is not None
    # the PID is right but the start time is not: as if the PID had been reused
    client._send({"deadline": time.monotonic() + 0.2, "pids": [[victim.pid, start + 1]]})
    ready, _, _ = select.select([proc.stdout], [], [], 3.0)
    assert ready, "the watchdog did not fire"
    assert proc.stdout.readline().strip().endswith("killed []")
    assert victim.poll() is None
