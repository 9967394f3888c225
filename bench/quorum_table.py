"""The quorum table, measured: what survives the loss of one (or more) lab members.

For each row a fresh ``parvisor lab up`` (unique ``PARVISOR_LAB_DIR``, ``LabUnderTest``,
``lab down`` in ``finally``) with tiny HA guests (``--preferred-hosts`` their host,
128 MiB), a settled cluster (quorum, every host a member, a manager, every guest's agent
answering), then the power loss of the named members (``Lab.fail``: link down + SIGKILL
of its namespace; several one right after the other). Watched for TTL + grace + 12 s at
0.25 s polls:

* **quorum**: a write (etcd txn put of a probe key) from outside, through every etcd
  endpoint that is left, once a second; the first success is reported;
* **VMs on the survivors**: kept running (same QEMU PID throughout), or fenced (QEMU
  gone: the host fenced itself, it cannot renew its lease without quorum);
* **HA VM of a lost host**: restarted on which survivor, how long after the loss.

Guests: shapes 2, 2w, 3 run one guest on every host. Shapes 3w and 5 have more hosts
than the 2-core box's cap of 3 guest-running hosts, so they run guests only where they
tell something: one on each lost host and one on a survivor (h1 and h2 when only the
witness is lost); the other hosts run their service and etcd member, idle.

Lab shapes (``plan()`` in ``parvisor/lab/lab.py``: an odd number of etcd voters; the
witness ``w`` always votes, with an even count the last host runs no etcd member):
2 hosts = one voter (h1); 2 hosts + witness = h1, h2, w; 3 hosts = h1, h2, h3;
3 hosts + witness = h1, h2, w (h3 runs no etcd member); 5 hosts = h1 ... h5.
INV-1 is checked at every poll. Runtime ~2 min per row on a quiet box, up to 5 min at
load 20 (5 hosts).

Usage: sudo .venv/bin/python bench/quorum_table.py [--rows 2:h2,2:h1,2w:w,2w:h1,3:h1]
       sudo .venv/bin/python bench/quorum_table.py --rows 3w:w,3w:h1,3w:h3,5:h1,5:h1+h2
Prints the table in markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failover import (GRACE_S, TTL_S, agent_answers, cluster, keep_logs,  # noqa: E402
                      loadavg, qemu_pid, where)

from parvisor.cluster.env import ClusterUnavailable  # noqa: E402
from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles, op_put  # noqa: E402
from parvisor.testing.guest_fixtures import tiny_image_for_tests  # noqa: E402
from parvisor.testing.lab_fixture import LabUnderTest  # noqa: E402

SHAPES = {"2": ("2 hosts", 2, ()), "2w": ("2 hosts + witness", 2, ("--witness",)),
          "3": ("3 hosts", 3, ()), "3w": ("3 hosts + witness", 3, ("--witness",)),
          "5": ("5 hosts", 5, ())}
# Shapes past the 2-core box's cap of 3 guest-running hosts: guests only where they tell
# something (the lost hosts and one survivor), the other hosts run no guest.
FEW_GUESTS = {"3w", "5"}
DEFAULT_ROWS = "2:h2,2:h1,2w:w,2w:h1,3:h1"
WATCH_S = TTL_S + GRACE_S + 12


def quorum_write(kv: EtcdKV | None) -> bool:
    if kv is None:
        return False
    try:
        ok, _, _ = kv.txn([], [op_put("/parvisor-bench/quorum-probe", str(time.time()))])
        return ok
    except ClusterUnavailable:
        return False


def kv_left(lab: LabUnderTest, lost: list[str]) -> EtcdKV | None:
    """An admin etcd client over every member that is left."""
    urls = [f"https://{n.ip}:2379" for n in lab.lab.state().nodes.values()
            if n.etcd and n.name not in lost]
    pki = lab.lab.pki
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "admin.crt"), str(pki / "admin.key"))
    return EtcdKV(urls, timeout_s=1.5, tls=tls) if urls else None


def guest_hosts(shape_key: str, names: list[str], lost: list[str]) -> list[str]:
    """Where the tiny HA guests run: every host, or (big shapes) each lost host and one
    survivor (two survivors when only the witness is lost)."""
    if shape_key not in FEW_GUESTS:
        return names
    survivors = [h for h in names if h not in lost]
    lost_hosts = [h for h in lost if h in names]
    return sorted(lost_hosts + survivors[:1 if lost_hosts else 2])


def settled(lab: LabUnderTest, hosts: int, vms: dict[str, str]) -> bool:
    state = cluster(lab)
    members = [h for h in state.get("hosts", []) if h["member"]]
    if not (state["quorum"] and len(members) == hosts and state.get("manager")):
        return False
    return all(where(lab, uuid) and where(lab, uuid)[0] == host for host, uuid in vms.items())


def start_guests(lab: LabUnderTest, hosts: list[str]) -> dict[str, str]:
    vms = {}
    for host in hosts:
        lab.on(host, "vm", "create", f"q{host}", "--image", "tiny", "--ha",
               "--memory", "128M", "--preferred-hosts", host)
        vms[host] = lab.vm_uuid(host, f"q{host}")
        lab.on(host, "vm", "start", f"q{host}")
    for host, uuid in vms.items():
        lab.wait(lambda: agent_answers(lab, host, uuid), 120,
                 f"the guest of q{host} on {host}", interval=0.5)
    return vms


def measure_row(shape_key: str, lost_spec: str) -> dict:
    label, hosts, extra = SHAPES[shape_key]
    lost = lost_spec.split("+")
    lab = LabUnderTest(hosts, *extra)
    try:
        voters = sorted(n.name for n in lab.lab.state().nodes.values() if n.etcd)
        names = [f"h{i}" for i in range(1, hosts + 1)]
        vms = start_guests(lab, guest_hosts(shape_key, names, lost))
        try:
            lab.wait(lambda: settled(lab, hosts, vms), 60, "a settled cluster", interval=0.5)
        except AssertionError:
            keep_logs(lab)
            print(f"  not settled: {json.dumps(cluster(lab), default=str)[:3000]}",
                  flush=True)
            raise
        pids = {host: qemu_pid(lab, host, uuid) for host, uuid in vms.items()}
        manager = cluster(lab).get("manager")
        load_before = loadavg()

        for name in lost:          # several losses: one after the other, at once
            lab.lab.fail(name)
        start = time.monotonic()
        kv = kv_left(lab, lost)
        survivors = {h: "kept running" for h in vms if h not in lost}
        moved: dict[str, tuple[str, float]] = {}   # lost host -> (survivor, seen at)
        write_ok_at, last_write, next_probe = None, False, 0.0
        while (elapsed := time.monotonic() - start) < WATCH_S:
            for host in survivors:
                now = where(lab, vms[host])
                if now != (host, pids[host]) and survivors[host] == "kept running":
                    survivors[host] = (f"stopped after {elapsed:.1f} s" if now is None
                                       else f"restarted/moved ({now[0]}) at {elapsed:.1f} s")
            for host in lost:
                if host in vms and host not in moved:
                    now = where(lab, vms[host])
                    if now is not None:
                        moved[host] = (now[0], elapsed)
            if elapsed >= next_probe:
                last_write = quorum_write(kv)
                if last_write and write_ok_at is None:
                    write_ok_at = time.monotonic() - start
                next_probe = time.monotonic() - start + 1.0
            time.sleep(0.25)
        last_write = quorum_write(kv)
    finally:
        lab.down()

    if write_ok_at is not None and last_write:
        quorum = f"yes (write ok {write_ok_at:.1f} s after)"
    elif write_ok_at is not None:
        quorum = "lost after a while"
    else:
        quorum = "**no** (writes fail)"
    if all(s == "kept running" for s in survivors.values()):
        on_survivors = "keep running (same QEMU PID)"
    else:
        on_survivors = "; ".join(f"{h}: {s}" for h, s in survivors.items())
        if all(s.startswith("stopped") for s in survivors.values()):
            on_survivors = "**fenced** (" + on_survivors + ")"
    if shape_key in FEW_GUESTS:
        on_survivors += f" [guests on {', '.join(sorted(survivors))}]"
    lost_vm = []
    for host in lost:
        if host not in vms:
            lost_vm.append("– (the witness runs no VM)")
        elif host in moved:
            lost_vm.append(f"restarted on {moved[host][0]} after {moved[host][1]:.1f} s")
        else:
            lost_vm.append(f"**down** (not restarted within {WATCH_S:g} s)")
    roles = [("witness, etcd voter" if h == "w" else
              "etcd voter" if h in voters else "no etcd member") +
             (", manager" if h == manager else "") for h in lost]
    return {"shape": label, "voters": ", ".join(voters),
            "lost": " + ".join(f"{h} ({r})" for h, r in zip(lost, roles)),
            "quorum": quorum, "survivors": on_survivors,
            "lost_vm": "; ".join(f"{h}: {v}" if len(lost) > 1 else v
                                 for h, v in zip(lost, lost_vm)),
            "load": load_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS,
                        help="SHAPE:LOST,... with SHAPE 2 | 2w | 3 | 3w | 5 and LOST a member "
                             "or several joined by + (default %(default)s)")
    args = parser.parse_args()
    tiny_image_for_tests()
    began = time.monotonic()
    rows = []
    for spec in args.rows.split(","):
        shape, _, lost = spec.partition(":")
        try:
            row = measure_row(shape, lost)
        except AssertionError as exc:      # a row that never settled: say so, go on
            print(f"  {spec}: not measured: {exc}", flush=True)
            continue
        rows.append(row)
        print(f"  {row['shape']}, lose {row['lost']}: quorum {row['quorum']}; survivors' "
              f"VMs {row['survivors']}; lost host's VM {row['lost_vm']} "
              f"(load before the loss {row['load']}, now {loadavg()})", flush=True)
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
