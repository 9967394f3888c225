"""Failover time of an HA VM whose disks are replicated (sync, local storage only) versus
the same HA VM on shared storage: host power loss -> the guest answers on the other host.

Two labs, one after the other, same shape: ``parvisor lab up --hosts 2 --witness``
(h1, h2 and an etcd-only witness: losing a host keeps a quorum), unique
``PARVISOR_LAB_DIR`` (``LabUnderTest``), lab defaults (lease TTL 8 s, recovery grace
1.5 s), ``lab down`` in ``finally``:

- **shared** (baseline): a normal lab, the VM's disks on the shared directory;
- **replica**: ``--no-shared-storage``; the VM's disks are on its host's local storage
  and ``vm replication enable --mode sync --to <other host>`` keeps a copy there; the
  trial waits for ``replication status --json`` = ``in-sync`` before the loss.

The same VM in both: ``vm create rfN --image tiny --ha --memory 128M --disk-size 32M
--preferred-hosts <host>``, a fresh one per trial (the manager allows 3 failovers per VM
per hour), on h1 and h2 in turn (a host is quarantined after 3 lease losses per hour).
Per trial, once the guest agent answers (and, replicated, the replica is in sync): the
VM's host is failed in-process (``Lab.fail``: link down + SIGKILL of its namespace, so
the clock starts at the cut), then measured: (1) a live QEMU of the VM on the other host,
(2) its guest agent answering ``guest-ping`` there. The VM is then turned off, the failed
host recovered, and the next trial waits for a healthy cluster. INV-1 is checked at every
poll. Medians of ``--runs`` trials per lab; the ratio replica / shared; and the floor
TTL + grace, the earliest the manager may act.

Usage: sudo .venv/bin/python bench/replication_failover.py [--runs 3] [--only shared|replica]
Runtime ~10-14 min with the defaults on a 2-core box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failover import (GRACE_S, TTL_S, agent_answers, cluster, healthy,  # noqa: E402
                      keep_logs, loadavg, where)

from parvisor.testing.guest_fixtures import tiny_image_for_tests  # noqa: E402
from parvisor.testing.lab_fixture import LabUnderTest  # noqa: E402

HOSTS = ("h1", "h2")
BASELINE_S = TTL_S + GRACE_S
MODES = {"shared": ("--witness",), "replica": ("--witness", "--no-shared-storage")}
# readiness polls, not deadlines: TCG guests on a loaded 2-core box
BOOT_S, SYNC_S, FAILOVER_S, HEALTHY_S = 120, 180, BASELINE_S + 60, 120


def replication_state(lab: LabUnderTest, host: str, vm: str) -> str | None:
    done = lab.on(host, "vm", "replication", "status", vm, "--json", check=False)
    return json.loads(done.stdout).get("state") if done.returncode == 0 else None


def prepare_vm(lab: LabUnderTest, mode: str, name: str, host: str, other: str) -> str:
    """The HA VM running on ``host``, guest agent up (replica mode: in sync to ``other``)."""
    lab.on(host, "vm", "create", name, "--image", "tiny", "--ha", "--memory", "128M",
           "--disk-size", "32M", "--preferred-hosts", host)
    vm_uuid = lab.vm_uuid(host, name)
    lab.on(host, "vm", "start", name)
    lab.wait(lambda: lab.running_on(vm_uuid) == [host], 60, f"{name} to run on {host}")
    lab.wait(lambda: agent_answers(lab, host, vm_uuid), BOOT_S,
             f"the guest agent of {name} on {host}", interval=0.5)
    if mode == "replica":
        lab.on(host, "vm", "replication", "enable", name, "--mode", "sync", "--to", other)
        lab.wait(lambda: replication_state(lab, host, name) == "in-sync", SYNC_S,
                 f"replication of {name} in sync", interval=0.5)
    return vm_uuid


def trial(lab: LabUnderTest, mode: str, run: int) -> dict:
    lab.wait(lambda: healthy(lab, len(HOSTS)), HEALTHY_S, "a healthy cluster", interval=0.5)
    host, other = HOSTS[(run - 1) % 2], HOSTS[run % 2]
    name = f"rf{run}"
    vm_uuid = prepare_vm(lab, mode, name, host, other)
    result: dict = {"failed": host, "to": None, "qemu_s": None, "agent_s": None}
    start = time.monotonic()
    lab.lab.fail(host)
    try:
        lab.wait(lambda: (where(lab, vm_uuid) or ("",))[0] == other, FAILOVER_S,
                 f"{name} on {other}")
        result["qemu_s"] = time.monotonic() - start
        lab.wait(lambda: agent_answers(lab, other, vm_uuid, timeout=0.5), BOOT_S,
                 f"the guest agent on {other}", interval=0.1)
        result["agent_s"] = time.monotonic() - start
        result["to"] = other
        lab.on(other, "vm", "turn-off", name)     # <= 1 guest at a time on 2 cores
    except AssertionError as exc:     # a failed failover is a result, not a crash
        if lab.double_runs:
            raise
        vm = next((v for v in cluster(lab, host).get("vms", []) if v["uuid"] == vm_uuid), {})
        result["error"] = (f"{exc}; VM {vm.get('phase')} on {vm.get('host')}: "
                           f"{vm.get('reason')} ({vm.get('protection')})")
    finally:
        lab.lab.recover(host)
    return result


def run_lab(mode: str, runs: int) -> list[dict]:
    print(f"\n[{mode}] lab up --hosts 2 {' '.join(MODES[mode])}", flush=True)
    lab = LabUnderTest(len(HOSTS), *MODES[mode])
    trials: list[dict] = []
    try:
        for run in range(1, runs + 1):
            t = trial(lab, mode, run)
            trials.append(t)
            if t["to"] is None:
                print(f"  [{mode}] trial {run}: fail {t['failed']}: NO FAILOVER: "
                      f"{t['error']}", flush=True)
            else:
                print(f"  [{mode}] trial {run}: fail {t['failed']} -> {t['to']}: QEMU "
                      f"{t['qemu_s']:.1f} s, agent {t['agent_s']:.1f} s (load {loadavg()})",
                      flush=True)
    except BaseException:
        state = cluster(lab)
        print(f"cluster: quorum {state.get('quorum')} {state.get('error', '')}\n"
              f"hosts {state.get('hosts')}\nvms {state.get('vms')}", file=sys.stderr)
        raise
    finally:
        keep_logs(lab)
        lab.down()
    return trials


def medians(trials: list[dict]) -> dict[str, float] | None:
    ok = [t for t in trials if t["to"] is not None]
    if not ok:
        return None
    return {k: statistics.median(t[k] for t in ok) for k in ("qemu_s", "agent_s")} | {
        "n": len(ok), "of": len(trials)}


def summary(results: dict[str, list[dict]], began: float) -> None:
    print(f"\n## Replica vs shared storage failover ({time.monotonic() - began:.0f} s total,"
          f" load avg {loadavg()}; floor TTL + grace = {BASELINE_S:g} s)\n")
    med = {mode: medians(trials) for mode, trials in results.items()}
    print("| storage | trials ok | power loss -> QEMU on the other host | "
          "-> guest agent answers there | values (agent) |")
    print("|---|---|---|---|---|")
    for mode, m in med.items():
        if m is None:
            print(f"| {mode} | 0/{len(results[mode])} | - | - | - |")
            continue
        values = ", ".join(f"{t['agent_s']:.1f}" for t in results[mode] if t["to"])
        print(f"| {mode} | {m['n']}/{m['of']} | {m['qemu_s']:.1f} s | {m['agent_s']:.1f} s"
              f" | {values} |")
    if med.get("shared") and med.get("replica"):
        print(f"\nratio replica / shared (medians): QEMU "
              f"{med['replica']['qemu_s'] / med['shared']['qemu_s']:.2f}, guest agent "
              f"{med['replica']['agent_s'] / med['shared']['agent_s']:.2f}")
    for mode, trials in results.items():
        for t in trials:
            if t["to"] is None:
                print(f"\n[{mode}] NO FAILOVER when {t['failed']} lost power: {t['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="power-loss trials per lab")
    parser.add_argument("--only", choices=sorted(MODES), help="one lab only")
    args = parser.parse_args()
    tiny_image_for_tests()
    began = time.monotonic()
    print(f"2 hosts + witness, TTL {TTL_S:g} s, grace {GRACE_S:g} s; load avg {loadavg()}",
          flush=True)
    modes = [args.only] if args.only else ["shared", "replica"]
    results = {mode: run_lab(mode, args.runs) for mode in modes}
    summary(results, began)


if __name__ == "__main__":
    main()
