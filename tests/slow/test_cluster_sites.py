"""Slow tier of the real cluster lab: two sites and a witness (``pytest -m slow``).

Shape: ``lab up --hosts 2 --witness --site a:h1 --site b:h2 --site w:w``: etcd voters
h1, h2 and the witness w (3 votes, one per site); one tiny HA guest per host. That is
the 2-core box's share of the simulator's 2+2+witness scenarios (``witness_loss``,
``site_split``): one host per site, so a host cut is a site cut.

(i) Witness loss (``lab fail w``): 2 of 3 voters remain; nothing happens to the running
    HA VMs (same QEMU PID on the same host for TTL + grace + 2 s), both hosts keep
    their leases, the cluster accepts writes.
(ii) Site split (``lab isolate h2``: site b loses its path to a *and* to the witness):
    h1 + w keep the majority, h1's VM keeps running (same PID throughout); h2 fences its
    HA VM by its deadline (TTL - margin + keepalive + request timeout + 0.5 s after the
    cut), the VM restarts on h1 and its guest answers there; after the heal exactly one
    copy of each VM runs. INV-1 is checked at every poll. Times are printed (-s).
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from parvisor.errors import GuestAgentError
from parvisor.guest.agent import GuestAgent
from parvisor.testing.lab_fixture import LabUnderTest, running_lab

TTL_S, MARGIN_S, INTERVAL_S, REQUEST_TIMEOUT_S, GRACE_S = 8.0, 2.5, 1.0, 1.0, 1.5
FENCE_BY_S = TTL_S - MARGIN_S + INTERVAL_S + REQUEST_TIMEOUT_S + 0.5
SHAPE = ("--witness", "--site", "a:h1", "--site", "b:h2", "--site", "w:w")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("ip") is None,
                                 reason="needs etcd-server and iproute2 (root)")]


@pytest.fixture
def lab(tiny_image):
    with running_lab(2, *SHAPE) as lab:
        yield lab


def _agent_answers(lab: LabUnderTest, host: str, vm_uuid: str) -> bool:
    agent = GuestAgent(lab.lab.state_dir(host) / "vms" / vm_uuid / "qga.sock")
    try:
        asyncio.run(agent.ping(timeout=1.0))
        return True
    except (GuestAgentError, OSError, asyncio.TimeoutError):
        return False


def _pid(lab: LabUnderTest, host: str, vm_uuid: str) -> int | None:
    try:
        pid = int((lab.lab.state_dir(host) / "vms" / vm_uuid / "qemu.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid in lab.lab.qemu_pids(host) else None


def _start_ha(lab: LabUnderTest, name: str, host: str) -> str:
    lab.on(host, "vm", "create", name, "--image", "tiny", "--ha", "--memory", "128M",
           "--preferred-hosts", host)
    vm_uuid = lab.vm_uuid(host, name)
    lab.on(host, "vm", "start", name)
    lab.wait(lambda: lab.running_on(vm_uuid) == [host], 60, f"{name} on {host}")
    lab.wait(lambda: _agent_answers(lab, host, vm_uuid), 90, f"the guest of {name}",
             interval=0.5)
    return vm_uuid


def _members(lab: LabUnderTest) -> dict[str, bool]:
    return {h["name"]: h["member"] for h in lab.lab.status()["cluster"].get("hosts", [])}


def _settled(lab: LabUnderTest) -> bool:
    cluster = lab.lab.status()["cluster"]
    return (cluster["quorum"] and cluster.get("manager") is not None
            and all(h["member"] for h in cluster["hosts"]) and len(cluster["hosts"]) == 2)


def test_witness_loss_changes_nothing(lab):
    assert {n: lab.lab.node(n).site for n in ("h1", "h2", "w")} == {"h1": "a", "h2": "b",
                                                                    "w": "w"}
    assert lab.lab.node("w").etcd and not lab.lab.node("w").runs_vms
    vms = {"h1": _start_ha(lab, "sa1", "h1"), "h2": _start_ha(lab, "sb1", "h2")}
    lab.wait(lambda: _settled(lab), 60, "a settled cluster")
    pids = {host: _pid(lab, host, uuid) for host, uuid in vms.items()}
    assert all(pids.values()), pids
    was_leader = any(e["leader"] for e in lab.lab.status()["cluster"]["etcd"]
                     if e["name"] == "w")

    lab.cli("lab", "fail", "w")
    lost = time.monotonic()
    writable_after = None
    watch_until = lost + TTL_S + GRACE_S + 2
    while time.monotonic() < watch_until:
        for host, uuid in vms.items():
            assert lab.running_on(uuid) == [host], f"{uuid} moved: {lab.running_on(uuid)}"
            assert _pid(lab, host, uuid) == pids[host], "witness loss restarted a QEMU"
        assert not lab.double_runs
        if writable_after is None and lab.lab.status()["cluster"]["quorum"]:
            writable_after = time.monotonic() - lost
        time.sleep(0.25)
    assert writable_after is not None, "no quorum after losing only the witness"
    assert _members(lab) == {"h1": True, "h2": True}, "a host lost its lease"
    # the cluster still decides: a new VM is placed and started
    lab.on("h2", "vm", "create", "sa2", "--image", "tiny", "--memory", "128M",
           "--preferred-hosts", "h1")
    sa2 = lab.vm_uuid("h1", "sa2")
    placed = time.monotonic()
    lab.on("h2", "vm", "start", "sa2")
    lab.wait(lambda: lab.running_on(sa2) == ["h1"], 60, "sa2 to start on h1")
    print(f"witness loss (w was etcd leader: {was_leader}): quorum read ok "
          f"{writable_after:.1f} s after; same QEMU PIDs on h1 and h2 for "
          f"{TTL_S + GRACE_S + 2:g} s; new VM placed+started in "
          f"{time.monotonic() - placed:.1f} s")


def test_site_split_fences_b_and_restarts_its_vm_on_a(lab):
    on_a, on_b = _start_ha(lab, "sa1", "h1"), _start_ha(lab, "sb1", "h2")
    lab.wait(lambda: _settled(lab), 60, "a settled cluster")
    pid_a = _pid(lab, "h1", on_a)

    def check_a() -> None:
        assert _pid(lab, "h1", on_a) == pid_a, "site a's VM was restarted or stopped"

    lab.cli("lab", "isolate", "h2")     # site b cut off from site a and from the witness
    cut = time.monotonic()
    lab.wait(lambda: (check_a(), "h2" not in lab.running_on(on_b))[1], FENCE_BY_S + 2,
             "h2 to fence sb1")
    fenced_s = time.monotonic() - cut
    assert fenced_s <= FENCE_BY_S, f"h2 fenced {fenced_s:.1f} s after the cut"
    lab.wait(lambda: (check_a(), lab.running_on(on_b) == ["h1"])[1], 60, "sb1 on h1")
    restarted_s = time.monotonic() - cut
    lab.wait(lambda: (check_a(), _agent_answers(lab, "h1", on_b))[1], 90,
             "sb1's guest on h1", interval=0.2)
    agent_s = time.monotonic() - cut
    assert restarted_s >= TTL_S - MARGIN_S, "restarted before h2 could have fenced"
    members = _members(lab)
    assert members["h1"] and not members["h2"], members

    lab.cli("lab", "heal", "h2")
    healed = time.monotonic()
    lab.wait(lambda: (check_a(), _members(lab).get("h2"))[1], 60, "h2 to rejoin")
    rejoin_s = time.monotonic() - healed
    watch_until = time.monotonic() + TTL_S + GRACE_S
    while time.monotonic() < watch_until:      # after the heal: exactly one copy each
        check_a()
        assert lab.running_on(on_a) == ["h1"]
        assert lab.running_on(on_b) == ["h1"], "sb1 started again on h2 after the heal"
        assert not lab.double_runs
        time.sleep(0.25)
    print(f"site split: h2 fenced sb1 {fenced_s:.1f} s after the cut (limit "
          f"{FENCE_BY_S:g} s); sb1 QEMU on h1 after {restarted_s:.1f} s, guest answers "
          f"after {agent_s:.1f} s; site a's VM same PID throughout; h2 rejoined "
          f"{rejoin_s:.1f} s after the heal; one copy of each VM afterwards")
