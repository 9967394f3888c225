"""Failover in the real lab: host power loss -> the HA guest answers on another host,
and false failovers over short network blips.

One ``parvisor lab up --hosts 3`` (unique ``PARVISOR_LAB_DIR``, ``LabUnderTest``), one
tiny HA guest (``vm create fo1 --image tiny --ha --memory 128M``), lab defaults (lease
TTL 8 s, keepalive 1 s, fence margin 2.5 s, recovery grace 1.5 s).

(a) Power loss, ``--runs`` trials (default 5). Per trial: the VM's current host is
    failed (``Lab.fail``: link down + SIGKILL of everything in its namespace, called
    in-process so the clock starts at the cut, not at a CLI's start-up). Measured from
    that moment: (1) a live QEMU of the VM on another host (pidfile in that host's state
    dir), (2) the guest agent answering ``guest-ping`` on that host's
    ``<state>/vms/<uuid>/qga.sock`` = guest userspace up. Then the failed host is
    recovered and the next trial waits for a healthy cluster (quorum, 3 members). The
    VM never fails back, so successive trials fail different hosts (etcd leader and
    cluster manager or not; both are printed per trial).
    **Baseline**: lease TTL + recovery grace (9.5 s), the earliest the manager may act
    after a power loss; the figure is the ratio measured / (TTL + grace). Medians.

(b) Blips, ``--blips`` rounds (default 10). The VM's host is isolated (``Lab.isolate``,
    link down, processes keep running) for 0.3 x TTL, then healed, then watched for
    TTL + grace + 2 s (long enough for any wrong failover to show). A false failover =
    the VM's QEMU (host, PID) changed or vanished at any 0.1 s poll; lease losses of the
    blipped host are counted separately. Target: 0.

INV-1 (a VM's live QEMU on <= 1 host) is checked at every poll (``LabUnderTest.wait`` /
``running_on``). ``lab down`` runs in ``finally``. Runtime ~6-8 min on 2 TCG cores.

Usage: sudo .venv/bin/python bench/failover.py [--runs 5] [--blips 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles  # noqa: E402
from parvisor.cluster.settings import ClusterSettings  # noqa: E402
from parvisor.cluster.status import cluster_status  # noqa: E402
from parvisor.errors import GuestAgentError  # noqa: E402
from parvisor.guest.agent import GuestAgent  # noqa: E402
from parvisor.testing.guest_fixtures import tiny_image_for_tests  # noqa: E402
from parvisor.testing.lab_fixture import LabUnderTest  # noqa: E402

TTL_S = ClusterSettings.lease_ttl_s
GRACE_S = ClusterSettings.recovery_grace_s
MARGIN_S = ClusterSettings.fence_margin_s
BASELINE_S = TTL_S + GRACE_S
HOSTS = 3


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


# --- lab helpers (also used by bench/quorum_table.py) -------------------------------------
def agent_answers(lab: LabUnderTest, host: str, vm_uuid: str, timeout: float = 1.0) -> bool:
    """guest-ping on the VM's qga.sock in ``host``'s state dir."""
    agent = GuestAgent(lab.lab.state_dir(host) / "vms" / vm_uuid / "qga.sock",
                       default_timeout=timeout)
    try:
        asyncio.run(agent.ping(timeout=timeout))
        return True
    except (GuestAgentError, OSError, asyncio.TimeoutError):
        return False


def qemu_pid(lab: LabUnderTest, host: str, vm_uuid: str) -> int | None:
    """The live QEMU PID of the VM on ``host`` (its pidfile there), or None."""
    try:
        pid = int((lab.lab.state_dir(host) / "vms" / vm_uuid / "qemu.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid in lab.lab.qemu_pids(host) else None


def where(lab: LabUnderTest, vm_uuid: str) -> tuple[str, int] | None:
    """(host, QEMU PID) of the VM's single copy, None when it runs nowhere (INV-1 checked)."""
    hosts = lab.running_on(vm_uuid)
    assert not lab.double_runs, f"INV-1 violated: {lab.double_runs}"
    if not hosts:
        return None
    pid = qemu_pid(lab, hosts[0], vm_uuid)
    return (hosts[0], pid) if pid else None


def kv_without(lab: LabUnderTest, lost: str | None = None) -> EtcdKV | None:
    """An admin etcd client over every member but ``lost``. (Not ``Lab.admin_kv`` after a
    loss: an ``EtcdKV`` whose first endpoint times out on connect raises instead of
    trying the next one, see docs/cluster.md "Measured".)"""
    urls = [f"https://{n.ip}:2379" for n in lab.lab.state().nodes.values()
            if n.etcd and n.name != lost]
    pki = lab.lab.pki
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "admin.crt"), str(pki / "admin.key"))
    return EtcdKV(urls, timeout_s=1.5, tls=tls) if urls else None


def cluster(lab: LabUnderTest, lost: str | None = None) -> dict:
    """``cluster status`` from outside (quorum, members, manager, VMs)."""
    try:
        kv = kv_without(lab, lost)
        if kv is None:
            return {"quorum": False, "error": "no etcd member left", "hosts": [], "etcd": []}
        return cluster_status(kv, "lab", lab.lab.shared_dir)
    except Exception as exc:          # noqa: BLE001  (status from outside; etcd may be cut)
        return {"quorum": False, "error": str(exc), "hosts": [], "etcd": []}


def healthy(lab: LabUnderTest, hosts: int) -> bool:
    state = cluster(lab)
    members = [h for h in state.get("hosts", []) if h["member"]]
    return bool(state["quorum"]) and len(members) == hosts and state.get("manager") is not None


def roles(lab: LabUnderTest, host: str) -> str:
    """'etcd leader', 'manager' of ``host`` right now (for the per-trial line)."""
    state = cluster(lab)
    found = [e["name"] for e in state.get("etcd", []) if e.get("leader")]
    out = ["etcd leader"] if host in found else []
    if state.get("manager") == host:
        out.append("manager")
    return ", ".join(out) or "-"


def start_ha_vm(lab: LabUnderTest, name: str, host: str, preferred: bool = True) -> str:
    extra = ["--preferred-hosts", host] if preferred else []
    lab.on(host, "vm", "create", name, "--image", "tiny", "--ha", "--memory", "128M", *extra)
    vm_uuid = lab.vm_uuid(host, name)
    lab.on(host, "vm", "start", name)
    running = lab.wait(lambda: where(lab, vm_uuid), 60, f"{name} to run")
    lab.wait(lambda: agent_answers(lab, running[0], vm_uuid), 90,
             f"the guest agent of {name} on {running[0]}", interval=0.5)
    return vm_uuid


def keep_logs(lab: LabUnderTest) -> None:
    """Copy the lab's service logs to a fresh /tmp dir (printed) before ``lab down``."""
    keep = Path(tempfile.mkdtemp(prefix="pvbench-lablogs-", dir="/tmp"))
    for log in lab.dir.glob("*/service.log"):
        shutil.copy(log, keep / f"{log.parent.name}-service.log")
    print(f"lab service logs kept in {keep}", file=sys.stderr)


# --- (a) power loss -------------------------------------------------------------------------
def power_loss_trial(lab: LabUnderTest, run: int) -> tuple[dict, str]:
    """A fresh HA VM per trial (the manager allows 3 failovers per VM per hour), on the
    next host in turn (a host is quarantined after 3 lease losses per hour)."""
    lab.wait(lambda: healthy(lab, HOSTS), 90, "a healthy cluster", interval=0.5)
    target = f"h{(run - 1) % HOSTS + 1}"
    vm_uuid = start_ha_vm(lab, f"fo{run}", target)
    failed = lab.wait(lambda: where(lab, vm_uuid), 60, "the VM to run")[0]
    role = roles(lab, failed)
    start = time.monotonic()
    lab.lab.fail(failed)
    try:
        moved = lab.wait(lambda: where(lab, vm_uuid), BASELINE_S + 30, "the VM on a survivor")
    except AssertionError as exc:     # a failed failover is a result, not a crash
        if lab.double_runs:
            raise
        vm = next((v for v in cluster(lab, failed).get("vms", []) if v["uuid"] == vm_uuid), {})
        lab.lab.recover(failed)
        return ({"failed": failed, "role": role, "to": None, "qemu_s": None,
                 "agent_s": None, "error": f"{exc}; VM {vm.get('phase')} on "
                 f"{vm.get('host')}: {vm.get('reason')}"}, vm_uuid)
    qemu_at = time.monotonic() - start
    assert moved[0] != failed, f"VM still reported on the failed host {failed}"
    lab.wait(lambda: agent_answers(lab, moved[0], vm_uuid, timeout=0.5), 90,
             f"the guest agent on {moved[0]}", interval=0.1)
    agent_at = time.monotonic() - start
    lab.lab.recover(failed)
    return ({"failed": failed, "role": role, "to": moved[0], "qemu_s": qemu_at,
             "agent_s": agent_at}, vm_uuid)


# --- (b) blips ------------------------------------------------------------------------------
def blip_round(lab: LabUnderTest, vm_uuid: str) -> dict:
    lab.wait(lambda: healthy(lab, HOSTS), 90, "a healthy cluster", interval=0.5)
    before = lab.wait(lambda: where(lab, vm_uuid), 60, "the VM to run")
    host = before[0]
    lab.lab.isolate(host)
    cut = time.monotonic()
    try:
        while time.monotonic() - cut < 0.3 * TTL_S:
            time.sleep(0.02)
    finally:
        lab.lab.heal(host)
    cut_s = time.monotonic() - cut
    changed: list[str] = []
    watch_until = time.monotonic() + TTL_S + GRACE_S + 2
    while time.monotonic() < watch_until:
        now = where(lab, vm_uuid)
        if now != before and (not changed or changed[-1] != str(now)):
            changed.append(str(now))
        time.sleep(0.1)
    members = {h["name"]: h["member"] for h in cluster(lab).get("hosts", [])}
    lease_lost = not members.get(host, False)
    if changed:      # a false failover: let it settle before the next round
        try:
            lab.wait(lambda: where(lab, vm_uuid), 60, "the VM to run again after the blip")
        except AssertionError:
            changed.append("not running again within 60 s")
    return {"host": host, "cut_s": cut_s, "changes": changed, "lease_lost": lease_lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="power-loss trials (>= 5)")
    parser.add_argument("--blips", type=int, default=10, help="0.3 x TTL blips")
    args = parser.parse_args()
    tiny_image_for_tests()
    began = time.monotonic()
    print(f"lab: {HOSTS} hosts, TTL {TTL_S:g} s, grace {GRACE_S:g} s, margin {MARGIN_S:g} s;"
          f" baseline TTL + grace = {BASELINE_S:g} s; load avg {loadavg()}", flush=True)
    lab = LabUnderTest(HOSTS)
    trials: list[dict] = []
    blips: list[dict] = []
    try:
        print("\n(a) host power loss -> guest agent answers on another host", flush=True)
        vm_uuid = ""
        for run in range(1, args.runs + 1):
            if vm_uuid and where(lab, vm_uuid):   # <= 2 guests at a time on 2 cores
                lab.on(where(lab, vm_uuid)[0], "vm", "turn-off", f"fo{run - 1}")
            t, vm_uuid = power_loss_trial(lab, run)
            trials.append(t)
            if t["to"] is None:
                print(f"  trial {run}: fail {t['failed']} ({t['role']}): NO FAILOVER: "
                      f"{t['error']}", flush=True)
                continue
            print(f"  trial {run}: fail {t['failed']} ({t['role']}) -> {t['to']}: "
                  f"QEMU {t['qemu_s']:.1f} s, agent {t['agent_s']:.1f} s "
                  f"(load {loadavg()})", flush=True)
        if trials[-1]["to"] is None:     # the blips need a running VM
            vm_uuid = start_ha_vm(lab, "fo-blip", "h1", preferred=False)
        print(f"\n(b) {args.blips} blips of 0.3 x TTL = {0.3 * TTL_S:.1f} s on the VM's host",
              flush=True)
        for run in range(1, args.blips + 1):
            b = blip_round(lab, vm_uuid)
            blips.append(b)
            verdict = f"CHANGED {b['changes']}" if b["changes"] else "same QEMU PID"
            print(f"  blip {run}: {b['host']} cut {b['cut_s']:.2f} s: {verdict}"
                  f"{', LEASE LOST' if b['lease_lost'] else ''}", flush=True)
            if b["changes"] and b["changes"][-1].startswith("not running"):
                break        # e.g. the failover limit: nothing left to blip
    except BaseException:
        state = cluster(lab)
        print(f"cluster: hosts {state.get('hosts')}\nvms {state.get('vms')}", file=sys.stderr)
        raise
    finally:
        keep_logs(lab)
        lab.down()

    ok = [t for t in trials if t["to"] is not None]
    qemu = statistics.median(t["qemu_s"] for t in ok)
    agent = statistics.median(t["agent_s"] for t in ok)
    false = sum(1 for b in blips if b["changes"])
    lost = sum(1 for b in blips if b["lease_lost"])
    print("\n## Failover summary (median of %d failed-over trials of %d, %d blips, %.0f s total,"
          " load avg %s)\n" % (len(ok), len(trials), len(blips), time.monotonic() - began,
                               loadavg()))
    print("| figure | median | min | max | baseline TTL + grace | ratio |")
    print("|---|---|---|---|---|---|")
    for label, key, med in (("power loss -> QEMU on another host", "qemu_s", qemu),
                            ("power loss -> guest agent answers there", "agent_s", agent)):
        values = [t[key] for t in ok]
        print(f"| {label} | {med:.1f} s | {min(values):.1f} s | {max(values):.1f} s "
              f"| {BASELINE_S:g} s | {med / BASELINE_S:.2f} |")
    for t in trials:
        if t["to"] is None:
            print(f"\nNO FAILOVER when {t['failed']} lost power: {t['error']}")
    print(f"\nfalse failovers (QEMU restarted or moved) over {len(blips)} blips of "
          f"{0.3 * TTL_S:.1f} s: {false} (target 0); lease losses: {lost}")


if __name__ == "__main__":
    main()
