"""The host stack end to end, as a user drives it: real service, real QEMU (TCG), the
tiny guest, the CLI. Each test gets its own service and state dir (fixture ``host``)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from parvisor.testing.guest_fixtures import pid_alive
from parvisor.testing.host_fixture import wait_for

pytestmark = pytest.mark.qemu


def test_full_lifecycle(host, tiny_image):
    vm = host.create_tiny("life", "--cpus", "2", "--memory", "256M")
    assert vm["state"] == "off" and vm["vcpus"] == 2
    started = host.cli("vm", "start", "life")
    if host.json("host", "info")["accelerator"] == "tcg":
        assert "TCG" in started.stderr          # said plainly on every start
    host.wait_agent("life")
    assert host.cli("vm", "exec", "life", "--", "uname", "-r").stdout.strip() \
        == tiny_image.kernel_release
    assert host.cli("vm", "exec", "life", "--", "false", check=False).returncode == 1
    # options after NAME belong to parvisor, everything after -- to the guest
    assert host.cli("vm", "exec", "life", "--timeout", "30", "--", "ls", "-d", "/proc").stdout \
        .strip() == "/proc"
    assert host.cli("vm", "exec", "life", "--", "sh", "-c", "exit 7",
                    check=False).returncode == 7
    shown = host.vm("life")
    assert "127.0.0.1" in shown["ip_addresses"] and shown["pid"]

    host.cli("vm", "pause", "life")
    assert host.state("life") == "paused"
    host.cli("vm", "resume", "life")
    assert host.state("life") == "running"

    host.cli("vm", "shutdown", "life", "--timeout", "60")
    shown = host.vm("life")
    assert shown["state"] == "off" and "guest shut down" in shown["state_reason"]
    assert "parvisor-guest: powering off" in host.console_log("life")
    assert not pid_alive(vm_pid := shown["pid"] or 0) or vm_pid == 0

    vm_dir = host.vm_dir("life")
    host.cli("vm", "delete", "life")
    assert host.cli("vm", "show", "life", check=False).returncode == 1
    assert not vm_dir.exists()


def test_shutdown_is_done_by_the_guest_via_acpi_when_no_agent(host):
    host.create_tiny("acpi")
    host.cli("vm", "start", "acpi")
    host.wait_agent("acpi")
    host.cli("vm", "exec", "acpi", "--", "sh", "-c",
             "(sleep 0.5; kill $(pidof qemu-ga)) >/dev/null 2>&1 &")
    wait_for(lambda: host.vm("acpi")["heartbeat"] == "lost", 30, "heartbeat lost")
    events = host.json("events", "--vm", "acpi")
    assert any("heartbeat lost" in e["message"] for e in events)
    host.cli("vm", "shutdown", "acpi", "--timeout", "60")
    shown = host.vm("acpi")
    assert shown["state"] == "off" and "did not shut down" not in shown["state_reason"]
    assert "parvisor-guest: powering off" in host.console_log("acpi")


def test_save_restore_and_start_from_saved_keep_guest_memory(host):
    host.create_tiny("keep")
    host.cli("vm", "start", "keep")
    host.wait_agent("keep")
    host.cli("vm", "exec", "keep", "--", "sh", "-c", "echo 4711 > /tmp/value")
    host.cli("vm", "save", "keep")
    assert host.state("keep") == "saved"
    assert (host.vm_dir("keep") / "saved.state").exists()
    host.cli("vm", "start", "keep")                  # start on saved = restore
    assert host.state("keep") == "running"
    assert host.cli("vm", "exec", "keep", "--", "cat", "/tmp/value").stdout.strip() == "4711"
    host.cli("vm", "save", "keep")
    host.cli("vm", "restore", "keep")
    assert host.cli("vm", "exec", "keep", "--", "cat", "/tmp/value").stdout.strip() == "4711"
    host.cli("vm", "save", "keep")
    host.cli("vm", "turn-off", "keep")               # discards the saved state
    assert host.state("keep") == "off"
    assert not (host.vm_dir("keep") / "saved.state").exists()
    assert host.cli("vm", "restore", "keep", check=False).returncode == 1


def test_service_restart_re_adopts_running_vms(host):
    for name in ("one", "two"):
        host.create_tiny(name)
        host.cli("vm", "start", name)
    for name in ("one", "two"):
        host.wait_agent(name)
    before = {name: (host.vm(name)["pid"], host.guest_uptime(name)) for name in ("one", "two")}
    host.kill(signal.SIGKILL)
    host.start()
    for name, (pid, uptime) in before.items():
        shown = host.vm(name)
        assert shown["state"] == "running" and shown["pid"] == pid
        host.wait_agent(name)
        assert host.guest_uptime(name) > uptime       # the same guest, not restarted
    assert any(e["kind"] == "adopted" for e in host.json("events"))


def test_qemu_killed_is_reported_crashed_within_one_second(host):
    host.create_tiny("victim")
    host.cli("vm", "start", "victim")
    pid = host.vm("victim")["pid"]
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: host.state("victim") == "crashed", 10, "state crashed")
    crash = [e for e in host.json("events", "--vm", "victim")
             if e["kind"] == "state" and e["details"].get("new") == "crashed"][-1]
    # Target 1 s; margin 0.5 s for the event write and scheduling on a loaded 2-core CI.
    assert crash["timestamp"] - killed_at <= 1.5
    assert "unexpectedly" in host.vm("victim")["state_reason"]
    host.cli("vm", "start", "victim")                # a crashed VM can be started again
    assert host.state("victim") == "running"


def test_vm_dead_while_service_down_is_marked_crashed(host):
    host.create_tiny("lonely")
    host.cli("vm", "start", "lonely")
    pid = host.vm("lonely")["pid"]
    host.kill(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 10, "QEMU gone")
    host.start()
    shown = host.vm("lonely")
    assert shown["state"] == "crashed" and "while the service was down" in shown["state_reason"]


def test_always_start_vm_is_started_when_the_service_starts(host):
    host.create_tiny("eager", "--auto-start", "always-start")
    host.create_tiny("lazy", "--auto-start", "nothing")
    host.restart()
    wait_for(lambda: host.state("eager") == "running", 30, "eager running")
    assert host.state("lazy") == "off"


def test_host_shutdown_saves_and_boot_brings_it_back(host):
    host.create_tiny("persist", "--auto-stop", "save")
    host.cli("vm", "start", "persist")
    host.wait_agent("persist")
    host.cli("vm", "exec", "persist", "--", "sh", "-c", "echo 99 > /tmp/value")
    results = host.json("host", "shutdown-vms")["results"]
    assert results == {"persist": "save"} and host.state("persist") == "saved"
    host.kill(signal.SIGTERM)                         # the host goes down
    host.start()                                      # and comes back
    wait_for(lambda: host.state("persist") == "running", 60, "restored at start")
    assert host.cli("vm", "exec", "persist", "--", "cat", "/tmp/value").stdout.strip() == "99"


def test_concurrent_conflicting_actions_one_wins(host):
    import concurrent.futures
    host.create_tiny("race")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: host.cli("vm", "start", "race", check=False),
                                range(4)))
    codes = sorted(r.returncode for r in results)
    assert codes.count(0) == 1 and codes.count(1) == 3
    assert all("busy" in r.stderr or "it is" in r.stderr for r in results if r.returncode)
    assert host.state("race") == "running"


def test_bad_input_on_the_cli(host):
    assert "not a size" in host.cli("vm", "create", "x", "--image", "tiny", "--memory", "12XB",
                                     check=False).stderr
    done = host.cli("vm", "create", "a/b", "--image", "tiny", check=False)
    assert done.returncode == 1 and done.stderr.startswith("error:")
    assert host.cli("vm", "start", "ghost", check=False).returncode == 1
    assert host.json("vm", "list") == []
