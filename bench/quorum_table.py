"""The quorum table, measured: what survives the loss of one lab member.

For each row a fresh ``parvisor lab up`` (unique ``PARVISOR_LAB_DIR``, ``LabUnderTest``,
``lab down`` in ``finally``) with one tiny HA guest per host (``--preferred-hosts`` that
host, 128 MiB), a settled cluster (quorum, every host a member, a manager, every guest's
agent answering), then one member's power loss (``Lab.fail``: link down + SIGKILL of its
namespace). Watched for TTL + grace + 12 s at 0.25 s polls:

* **quorum**: a write (etcd txn put of a probe key) from outside, through every etcd
  endpoint that is left, once a second; the first success is reported;
* **VMs on the survivors**: kept running (same QEMU PID throughout), or fenced (QEMU
  gone: the host fenced itself, it cannot renew its lease without quorum);
* **HA VM of the lost host**: restarted on which survivor, how long after the loss.

Lab shapes (``parvisor/lab/lab.py``: an odd number of etcd voters; the witness ``w``
always votes, with an even count the last host runs no etcd member): 2 hosts = one voter
(h1); 2 hosts + witness = h1, h2, w; 3 hosts = h1, h2, h3. 3 + witness and 5 hosts need
more than the 2-core box's cap of 3 guest-running hosts and are not measured.
INV-1 is checked at every poll. Runtime ~6-8 min.

Usage: sudo .venv/bin/python bench/quorum_table.py [--rows 2:h2,2:h1,2w:w,2w:h1,3:h1]
Prints the table in markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failover import (GRACE_S, TTL_S, agent_answers, cluster, kv_without,  # noqa: E402
                      loadavg, qemu_pid, where)

from parvisor.cluster.env import ClusterUnavailable  # noqa: E402
from parvisor.cluster.etcd_kv import EtcdKV, op_put  # noqa: E402
from parvisor.testing.guest_fixtures import tiny_image_for_tests  # noqa: E402
from parvisor.testing.lab_fixture import LabUnderTest  # noqa: E402

SHAPES = {"2": ("2 hosts", 2, ()), "2w": ("2 hosts + witness", 2, ("--witness",)),
          "3": ("3 hosts", 3, ())}
DEFAULT_ROWS = "2:h2,2:h1,2w:w,2w:h1,3:h1"
WATCH_S = TTL_S + GRACE_S + 12


def quorum_write(lab: LabUnderTest, kv: EtcdKV | None) -> bool:
    if kv is None:
        return False
    try:
        ok, _, _ = kv.txn([], [op_put("/parvisor-bench/quorum-probe", str(time.time()))])
        return ok
    except ClusterUnavailable:
        return False


def settled(lab: LabUnderTest, hosts: int, vms: dict[str, str]) -> bool:
    state = cluster(lab)
    members = [h for h in state.get("hosts", []) if h["member"]]
    if not (state["quorum"] and len(members) == hosts and state.get("manager")):
        return False
    return all(where(lab, uuid) and where(lab, uuid)[0] == host for host, uuid in vms.items())


def measure_row(shape_key: str, lost: str) -> dict:
    label, hosts, extra = SHAPES[shape_key]
    lab = LabUnderTest(hosts, *extra)
    try:
        voters = sorted(n.name for n in lab.lab.state().nodes.values() if n.etcd)
        names = [f"h{i}" for i in range(1, hosts + 1)]
        vms = {}
        for host in names:
            lab.on(host, "vm", "create", f"q{host}", "--image", "tiny", "--ha",
                   "--memory", "128M", "--preferred-hosts", host)
            vms[host] = lab.vm_uuid(host, f"q{host}")
            lab.on(host, "vm", "start", f"q{host}")
        for host, uuid in vms.items():
            lab.wait(lambda: agent_answers(lab, host, uuid), 120,
                     f"the guest of q{host} on {host}", interval=0.5)
        lab.wait(lambda: settled(lab, hosts, vms), 60, "a settled cluster", interval=0.5)
        pids = {host: qemu_pid(lab, host, uuid) for host, uuid in vms.items()}
        manager = cluster(lab).get("manager")

        lab.lab.fail(lost)
        start = time.monotonic()
        kv = kv_without(lab, lost)
        survivors = {h: "kept running" for h in names if h != lost}
        moved: dict[str, float] = {}      # lost host's VM: survivor -> first seen at
        write_ok_at, last_write, next_probe = None, False, 0.0
        while (elapsed := time.monotonic() - start) < WATCH_S:
            for host in survivors:
                now = where(lab, vms[host])
                if now != (host, pids[host]) and survivors[host] == "kept running":
                    survivors[host] = (f"stopped after {elapsed:.1f} s" if now is None
                                       else f"restarted/moved ({now[0]}) at {elapsed:.1f} s")
            if lost in vms and not moved:
                now = where(lab, vms[lost])
                if now is not None:
                    moved[now[0]] = elapsed
            if elapsed >= next_probe:
                last_write = quorum_write(lab, kv)
                if last_write and write_ok_at is None:
                    write_ok_at = time.monotonic() - start
                next_probe = time.monotonic() - start + 1.0
            time.sleep(0.25)
        last_write = quorum_write(lab, kv)
    finally:
        lab.down()

    if write_ok_at is not None and last_write:
        quorum = f"yes (write ok {write_ok_at:.1f} s after)"
    elif write_ok_at is not None:
        quorum = "lost after a while"
    else:
        quorum = "**no** (writes fail)"
    kept = {h: s for h, s in survivors.items()}
    if all(s == "kept running" for s in kept.values()):
        on_survivors = "keep running (same QEMU PID)"
    else:
        on_survivors = "; ".join(f"{h}: {s}" for h, s in kept.items())
        if all(s.startswith("stopped") for s in kept.values()):
            on_survivors = "**fenced** (" + on_survivors + ")"
    if lost not in vms:
        lost_vm = "– (the witness runs no VM)"
    elif moved:
        (to, at), = moved.items()
        lost_vm = f"restarted on {to} after {at:.1f} s"
    else:
        lost_vm = f"**down** (not restarted within {WATCH_S:g} s)"
    role = ("witness, etcd voter" if lost == "w" else
            "etcd voter" if lost in voters else "no etcd member") + (
            ", manager" if lost == manager else "")
    return {"shape": label, "voters": ", ".join(voters), "lost": f"{lost} ({role})",
            "quorum": quorum, "survivors": on_survivors, "lost_vm": lost_vm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS,
                        help="SHAPE:LOST,... with SHAPE 2 | 2w | 3 (default %(default)s)")
    args = parser.parse_args()
    tiny_image_for_tests()
    began = time.monotonic()
    rows = []
    for spec in args.rows.split(","):
        shape, _, lost = spec.partition(":")
        row = measure_row(shape, lost)
        rows.append(row)
        print(f"  {row['shape']}, lose {row['lost']}: quorum {row['quorum']}; survivors' "
              f"VMs {row['survivors']}; lost host's VM {row['lost_vm']} "
              f"(load {loadavg()})", flush=True)
    print(f"\n## Quorum table (TTL {TTL_S:g} s, grace {GRACE_S:g} s, watched {WATCH_S:g} s "
          f"after the loss; {time.monotonic() - began:.0f} s total, load avg {loadavg()})\n")
    print("| lab shape | etcd voters | member lost | quorum | HA VMs on the survivors "
          "| HA VM of the lost host |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['voters']} | {r['lost']} | {r['quorum']} "
              f"| {r['survivors']} | {r['lost_vm']} |")


if __name__ == "__main__":
    main()
