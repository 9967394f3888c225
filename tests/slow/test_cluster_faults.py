"""Slow tier of the real cluster lab (``pytest -m slow``): network isolation and etcd
quorum loss with a tiny HA guest under QEMU TCG, INV-1 checked at every poll.

Deadlines (defaults TTL 8 s, margin 2.5 s, keepalive 1 s): an isolated host must have
killed its HA QEMU within TTL - margin = 5.5 s of its last successful keepalive, which
was sent at most 1 s (+ one 1 s request timeout) before the cut: asserted as <= 7.5 s
after the cut, + 0.5 s polling margin. Recovery elsewhere only after that kill.
"""

from __future__ import annotations

import shutil
import time

import pytest

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
    lab.on(host, "vm", "create", name, "--image", "tiny", "--ha", "--memory", "128M",
           "--preferred-hosts", host)
    vm_uuid = lab.vm_uuid(host, name)
    lab.on(host, "vm", "start", name)
    lab.wait(lambda: lab.running_on(vm_uuid) == [host], 30, f"{name} on {host}")
    return vm_uuid


def test_isolated_host_fences_by_its_deadline_and_nothing_runs_twice(lab):
    vm_uuid = _start_ha(lab, "iso1", "h1")
    lab.cli("lab", "isolate", "h1")
    cut = time.monotonic()
    lab.wait(lambda: "h1" not in lab.running_on(vm_uuid), FENCE_BY_S + 2, "h1 to fence")
    fenced_after = time.monotonic() - cut
    assert fenced_after <= FENCE_BY_S, f"h1 fenced {fenced_after:.1f} s after the cut"
    lab.wait(lambda: lab.running_on(vm_uuid) in (["h2"], ["h3"]), 30, "recovery elsewhere")
    moved_to = lab.running_on(vm_uuid)
    lab.cli("lab", "heal", "h1")
    lab.wait(lambda: any(h["name"] == "h1" and h["member"]
                         for h in lab.lab.status()["cluster"]["hosts"]), 40, "h1 back")
    watch_until = time.monotonic() + 5
    while time.monotonic() < watch_until:       # after the heal: still exactly one copy
        assert lab.running_on(vm_uuid) == moved_to
        time.sleep(0.25)


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
