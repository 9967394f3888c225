"""Slow tier (``./setup.sh test --slow``): soak and fault loops over the host stack.

Each loop repeats what the fast tier checks once, to shake out races: leaked QEMUs,
stuck states, store drift across many service restarts."""

from __future__ import annotations

import os
import signal

import pytest

from parvisor.testing.guest_fixtures import pid_alive
from parvisor.testing.host_fixture import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


def test_start_stop_cycles_leave_no_qemu_behind(host):
    host.create_tiny("cycle")
    for round_ in range(15):
        host.cli("vm", "start", "cycle")
        pid = host.vm("cycle")["pid"]
        if round_ % 3 == 0:
            host.wait_agent("cycle")
            host.cli("vm", "shutdown", "cycle", "--timeout", "60")
        else:
            host.cli("vm", "turn-off", "cycle")
        assert host.state("cycle") == "off"
        wait_for(lambda: not pid_alive(pid), 10, f"QEMU {pid} gone")


def test_save_restore_cycles_keep_memory(host):
    host.create_tiny("mem")
    host.cli("vm", "start", "mem")
    host.wait_agent("mem")
    for round_ in range(10):
        host.cli("vm", "exec", "mem", "--", "sh", "-c", f"echo {round_} > /tmp/round")
        host.cli("vm", "save", "mem")
        host.cli("vm", "start", "mem")
        assert host.cli("vm", "exec", "mem", "--", "cat", "/tmp/round").stdout.strip() \
            == str(round_)


def test_many_service_kills_never_lose_or_restart_vms(host):
    names = [f"s{i}" for i in range(3)]
    for name in names:
        host.create_tiny(name)
        host.cli("vm", "start", name)
    pids = {name: host.vm(name)["pid"] for name in names}
    for _ in range(10):
        host.kill(signal.SIGKILL)
        host.start()
        for name in names:
            shown = host.vm(name)
            assert shown["state"] == "running" and shown["pid"] == pids[name]


def test_crash_restart_loop(host):
    host.create_tiny("fragile")
    for _ in range(8):
        host.cli("vm", "start", "fragile")
        os.kill(host.vm("fragile")["pid"], signal.SIGKILL)
        wait_for(lambda: host.state("fragile") == "crashed", 5, "crashed")
    crashes = [e for e in host.json("events", "--vm", "fragile", "--limit", "500")
               if e["kind"] == "state" and e["details"].get("new") == "crashed"]
    assert len(crashes) == 8
