"""Slow tier: the rest of RELIABILITY.md's lab fault matrix, on a real 3-host lab (netns,
etcd with TLS, tiny HA guests under QEMU TCG), INV-1 checked at every poll.

* **Asymmetric partition** (nftables in the host's namespace drops only what arrives on
  its link, or only what leaves on it): the host can no longer renew its lease in either
  case, so it must fence by its deadline and the others restart its HA VM — decided by
  etcd reachability alone, never two copies, and after the rule is removed still one.
* **Wall clock jump** (+1 h, then back −1 h): decisions use the monotonic clock (INV-6),
  so nothing moves, fences or restarts. The lab's hosts share one kernel clock, so the
  jump hits every agent and every etcd member at once — a harsher case than the matrix's
  "faketime on one agent" (libfaketime 0.9.10 cannot fake only the wall clock for
  Python >= 3.11: its clock_nanosleep wrapper breaks time.sleep, libfaketime issue 426).
  The test puts the clock back in ``finally`` by the exact offset it added.

Deadlines as in test_cluster_faults.py: fence within TTL - margin of the last successful
keepalive, which was sent at most interval + one request timeout before the cut.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from parvisor.testing.lab_fixture import LabUnderTest, running_lab

TTL_S, MARGIN_S, INTERVAL_S, REQUEST_TIMEOUT_S, GRACE_S = 8.0, 2.5, 1.0, 1.0, 1.5
FENCE_BY_S = TTL_S - MARGIN_S + INTERVAL_S + REQUEST_TIMEOUT_S + 0.5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("nft") is None,
                                 reason="needs etcd-server and nftables")]


@pytest.fixture(scope="module")
def lab(tiny_image):
    with running_lab(3) as lab:
        yield lab


def _members(lab: LabUnderTest) -> set[str]:
    return {h["name"] for h in lab.lab.status()["cluster"].get("hosts", []) if h["member"]}


def _start_ha(lab: LabUnderTest, name: str, host: str) -> str:
    lab.wait(lambda: _members(lab) == {"h1", "h2", "h3"}, 60, "every host a member")
    lab.on(host, "vm", "create", name, "--image", "tiny", "--ha", "--memory", "128M",
           "--preferred-hosts", host)
    vm_uuid = lab.vm_uuid(host, name)
    lab.on(host, "vm", "start", name)
    lab.wait(lambda: lab.running_on(vm_uuid) == [host], 30, f"{name} on {host}")
    return vm_uuid


def _nft(lab: LabUnderTest, host: str, script: str) -> None:
    ns = lab.lab.node(host).ns
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True)


def _drop_one_direction(lab: LabUnderTest, host: str, direction: str) -> None:
    """Drop what arrives on (``input``) or leaves by (``output``) the host's link only;
    its loopback stays up (its own etcd member answers it, as on a real host)."""
    match = "iifname" if direction == "input" else "oifname"
    _nft(lab, host, f"table inet pvasym {{\n chain c {{\n  type filter hook {direction} "
                    f"priority 0;\n  {match} \"eth0\" drop\n }}\n}}\n")


def _undo(lab: LabUnderTest, host: str) -> None:
    _nft(lab, host, "delete table inet pvasym\n")


@pytest.mark.parametrize("direction", ["input", "output"])
def test_asymmetric_partition_fences_by_the_deadline_and_never_runs_twice(lab, direction):
    name = f"asym{direction[0]}"
    vm_uuid = _start_ha(lab, name, "h1")
    _drop_one_direction(lab, "h1", direction)
    cut = time.monotonic()
    try:
        lab.wait(lambda: "h1" not in lab.running_on(vm_uuid), FENCE_BY_S + 2, "h1 to fence")
        fenced_after = time.monotonic() - cut
        assert fenced_after <= FENCE_BY_S, f"h1 fenced {fenced_after:.1f} s after the cut"
        lab.wait(lambda: lab.running_on(vm_uuid) in (["h2"], ["h3"]), 30,
                 "recovery on a host that reaches etcd")
        moved_to = lab.running_on(vm_uuid)
    finally:
        _undo(lab, "h1")
    lab.wait(lambda: "h1" in _members(lab), 40, "h1 back as a member")
    watch_until = time.monotonic() + 5
    while time.monotonic() < watch_until:       # healed: still exactly one copy
        assert lab.running_on(vm_uuid) == moved_to
        time.sleep(0.25)
    print(f"{direction}-only partition: fenced after {fenced_after:.1f} s, "
          f"restarted on {moved_to[0]}")
    lab.on(moved_to[0], "vm", "turn-off", name)


def _jump_wall_clock(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, time.time() + seconds)


def test_wall_clock_jumps_change_no_decision(lab):
    vm_uuid = _start_ha(lab, "clock1", "h2")
    pids = lab.lab.qemu_pids("h2")
    offset = 0.0
    try:
        for jump in (3600.0, -3600.0):      # forward an hour, then back to the true time
            _jump_wall_clock(jump)
            offset += jump
            watch_until = time.monotonic() + TTL_S + GRACE_S + 2
            while time.monotonic() < watch_until:
                assert lab.running_on(vm_uuid) == ["h2"], f"after a {jump:+.0f} s jump"
                assert lab.lab.qemu_pids("h2") == pids, "QEMU restarted after a clock jump"
                time.sleep(0.25)
            assert _members(lab) == {"h1", "h2", "h3"}, f"a lease lost after {jump:+.0f} s"
    finally:
        if offset:
            _jump_wall_clock(-offset)
    lab.on("h2", "vm", "turn-off", "clock1")
