"""Slow tier of the real cluster lab (``pytest -m slow``): network isolation and etcd
quorum loss with a tiny HA guest under QEMU TCG, INV-1 checked at every poll.

Deadlines (defaults TTL 8 s, margin 2.5 s, keepalive 1 s): an isolated host must have
killed its HA QEMU within TTL - margin = 5.5 s of its last successful keepalive, which
was sent at most 1 s (+ one 1 s request timeout) before the cut: asserted as <= 7.5 s
after the cut, + 0.5 s polling margin. Recovery elsewhere only after that kill.

INV-1 is also checked from the shared disk's side: each HA guest runs the canary
(``parvisor.testing.canary``) labelled with its host, restarted with the new host's label
after a move; the log must show one host's records after another's, never interleaved
(an isolated host that failed to fence would go on writing between the new copy's).
"""

from __future__ import annotations

import shutil
import time

import pytest

from parvisor.testing import canary
from parvisor.testing.lab_fixture import LabUnderTest

TTL_S, MARGIN_S, INTERVAL_S, REQUEST_TIMEOUT_S = 8.0, 2.5, 1.0, 1.0
FENCE_BY_S = TTL_S - MARGIN_S + INTERVAL_S + REQUEST_TIMEOUT_S + 0.5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd-server")]


@pytest.fixture
def lab(tiny_image):
    lab = LabUnderTest(3)
    try:
        yield lab
    finally:
        lab.down()


def _start_ha(lab: LabUnderTest, name: str, host: str) -> str:
    """An HA VM on ``host`` with a 16M shared disk, its canary writing."""
    lab.on(host, "vm", "create", name, "--image", "tiny", "--ha", "--memory", "128M",
           "--preferred-hosts", host, "--disk-size", "16M")
    vm_uuid = lab.vm_uuid(host, name)
    lab.on(host, "vm", "start", name)
    lab.wait(lambda: lab.running_on(vm_uuid) == [host], 30, f"{name} on {host}")
    _canary_on(lab, host, name)
    return vm_uuid


def _canary_on(lab: LabUnderTest, host: str, name: str, asking: str = "h2") -> None:
    """Start the canary in ``name`` on ``host``; wait for 3 records of its own."""
    lab.wait(lambda: lab.on(host, "vm", "exec", name, "--", "true", check=False)
             .returncode == 0, 60, f"the guest agent of {name} on {host}")
    lab.start_canary(host, name)
    lab.wait(lambda: lab.canary_log(name, asking).count(host) >= 3, 30,
             f"canary records from {host}", interval=0.5)


def _one_host_after_another(lab: LabUnderTest, name: str, hosts: list[str]) -> None:
    verdict = lab.canary_log(name)
    canary.assert_no_interleaving(verdict)
    assert [host for host, _ in verdict.runs] == hosts, verdict.runs


def test_isolated_host_fences_by_its_deadline_and_nothing_runs_twice(lab):
    vm_uuid = _start_ha(lab, "iso1", "h1")
    lab.cli("lab", "isolate", "h1")
    cut = time.monotonic()
    lab.wait(lambda: "h1" not in lab.running_on(vm_uuid), FENCE_BY_S + 2, "h1 to fence")
    fenced_after = time.monotonic() - cut
    assert fenced_after <= FENCE_BY_S, f"h1 fenced {fenced_after:.1f} s after the cut"
    lab.wait(lambda: lab.running_on(vm_uuid) in (["h2"], ["h3"]), 30, "recovery elsewhere")
    moved_to = lab.running_on(vm_uuid)
    _canary_on(lab, moved_to[0], "iso1")
    lab.cli("lab", "heal", "h1")
    lab.wait(lambda: any(h["name"] == "h1" and h["member"]
                         for h in lab.lab.status()["cluster"]["hosts"]), 40, "h1 back")
    watch_until = time.monotonic() + 5
    while time.monotonic() < watch_until:       # after the heal: still exactly one copy
        assert lab.running_on(vm_uuid) == moved_to
        time.sleep(0.25)
    _one_host_after_another(lab, "iso1", ["h1", moved_to[0]])


def test_quorum_loss_stops_ha_vms_and_heal_brings_each_back_once(lab):
    vm_uuid = _start_ha(lab, "q1", "h1")
    lab.cli("lab", "isolate", "h2")
    lab.cli("lab", "isolate", "h3")       # h1's etcd member alone: no quorum anywhere
    lab.wait(lambda: lab.running_on(vm_uuid) == [], FENCE_BY_S + 2, "every host to fence")
    lab.cli("lab", "heal", "h2")
    lab.cli("lab", "heal", "h3")
    lab.wait(lambda: len(lab.running_on(vm_uuid)) == 1, 60, "q1 back after the heal")
    watch_until = time.monotonic() + 5
    first = lab.running_on(vm_uuid)
    while time.monotonic() < watch_until:
        assert lab.running_on(vm_uuid) == first
        time.sleep(0.25)
    _canary_on(lab, first[0], "q1")
    # back on h1: one run of h1's records (the restarted canary continues its log)
    _one_host_after_another(lab, "q1", ["h1"] if first == ["h1"] else ["h1", first[0]])
