"""Replicated VM storage in the lab (issue 9): local storage only, no shared directory,
real QEMU under TCG, real etcd, the replica served by qemu-storage-daemon over NBD+TLS.

The guest writes numbered 4 KiB records to its replicated disk (``/dev/vda``) with
``O_DIRECT`` and ``fsync``, one ``vm exec`` per record: a record whose exec returned is
*acknowledged*. The CI test fails the primary mid-stream and checks that every
acknowledged record is on the replica the VM restarts from; then the old primary comes
back (it must not start its stale copy, and becomes the replica after a resync), and a
planned failover moves the VM back with nothing lost. Slow tier: asynchronous mode (what
is lost is at most about one interval, as the RPO said) and the replica link cut (guest
writes stall at most the limit, ``broken``; healed: resync, ``in-sync``).

Hosts: h1, h2 and a witness (three etcd voters, so losing h1 keeps a quorum).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from parvisor.testing.lab_fixture import running_lab
from parvisor.testing.replication_lab import (FAILOVER_S, STALL_LIMIT_S, SYNC_S, Writer,
                                              make_vm, read_records, status, wait_guest,
                                              wait_state, write_records)

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("ip") is None
                                 or shutil.which("qemu-storage-daemon") is None,
                                 reason="needs etcd-server, iproute2 and qemu-storage-daemon")]


def test_sync_replica_failover_split_brain_and_planned_failover_back(tiny_image):
    with running_lab(2, "--witness", "--no-shared-storage") as lab:
        vm_uuid = make_vm(lab, "rp1", "--mode", "sync", "--to", "h2",
                          "--stall-limit", str(STALL_LIMIT_S))
        state = wait_state(lab, "h1", "rp1", "in-sync", SYNC_S)
        assert state["primary"] == "h1" and state["replica"] == "h2" and state["rpo_s"] == 0
        write_records(lab, "h1", "rp1", range(1, 4))

        # --- the primary loses power mid-stream --------------------------------------
        writer = Writer(lab, "h1", "rp1", 4)
        writer.start()
        lab.wait(lambda: len(writer.acked) >= 3, 60, "records acknowledged on h1")
        lab.cli("lab", "fail", "h1")
        writer.join(60)
        acked = set(range(1, 4)) | set(writer.acked)
        lab.wait(lambda: lab.running_on(vm_uuid) == ["h2"], FAILOVER_S, "rp1 on h2")
        wait_guest(lab, "h2", "rp1")
        # h2 reads only its own copy: h1's disk is unreachable now, from h2 and from
        # the machine itself (lab fail covers h1's local storage)
        h1_disk = status(lab, "h2", "rp1")["images"]["h1"]["disk0"]
        lab.sh("h2", f"test ! -e {h1_disk}")
        assert not Path(h1_disk).exists()
        survived = read_records(lab, "h2", "rp1", max(acked) + 5)
        assert acked <= survived, f"acknowledged records lost: {sorted(acked - survived)}"
        failed_over = status(lab, "h2", "rp1")
        assert failed_over["primary"] == "h2" and failed_over["generation"] == 2

        # --- the VM writes on h2; h1 comes back: no second copy, it becomes the replica
        top = max(survived) + 1
        write_records(lab, "h2", "rp1", range(top, top + 3))
        lab.cli("lab", "recover", "h1")
        state = wait_state(lab, "h2", "rp1", "in-sync", SYNC_S, replica="h1")
        assert state["primary"] == "h2" and state["generation"] == 2
        assert lab.running_on(vm_uuid) == ["h2"]          # (and at every poll above)

        # --- planned failover back to h1: nothing lost -------------------------------
        lab.on("h2", "vm", "replication", "failover", "rp1", "--planned")
        lab.wait(lambda: lab.running_on(vm_uuid) == ["h1"], FAILOVER_S, "rp1 back on h1")
        wait_guest(lab, "h1", "rp1")
        both = read_records(lab, "h1", "rp1", top + 5)
        assert acked | set(range(top, top + 3)) <= both
        back = wait_state(lab, "h1", "rp1", "in-sync", SYNC_S, replica="h2")
        assert back["primary"] == "h1" and back["generation"] == 3

        # --- disable: the replica's images and daemons go, the VM runs on -------------
        replica_image = back["images"]["h2"]["disk0"]
        assert lab.sh("h2", f"test -e {replica_image}", check=False).returncode == 0
        assert lab.on("h1", "vm", "delete", "rp1", "--force", check=False).returncode != 0
        lab.on("h2", "vm", "replication", "disable", "rp1")
        lab.wait(lambda: not status(lab, "h1", "rp1"), 60, "the replication record gone")
        assert lab.sh("h2", f"test -e {replica_image}", check=False).returncode != 0
        assert lab.running_on(vm_uuid) == ["h1"]
        lab.on("h1", "vm", "delete", "rp1", "--force")


@pytest.mark.slow
def test_test_failover_boots_an_isolated_copy_while_replication_goes_on(tiny_image):
    with running_lab(2, "--witness", "--no-shared-storage") as lab:
        vm_uuid = make_vm(lab, "tf1", "--mode", "sync", "--to", "h2")
        wait_state(lab, "h1", "tf1", "in-sync", SYNC_S)
        write_records(lab, "h1", "tf1", range(1, 4))

        # asked on h1 (the primary): carried out by the replica host h2
        lab.on("h1", "vm", "replication", "failover", "tf1", "--test")
        test_uuid = lab.vm_uuid("h1", "tf1-test")
        lab.wait(lambda: lab.running_on(test_uuid) == ["h2"], FAILOVER_S, "tf1-test on h2")
        wait_guest(lab, "h2", "tf1-test")
        assert {1, 2, 3} <= read_records(lab, "h2", "tf1-test", 8)
        shown = json.loads(lab.on("h2", "vm", "show", "tf1-test", "--json").stdout)
        assert shown["ha_status"] == "not HA" and "test failover" in shown["notes"]
        switch = _switches(lab, "h2")["tf1-test"]
        assert switch["definition"]["type"] == "private" and switch["bridge_present"]
        second = lab.on("h1", "vm", "replication", "failover", "tf1", "--test", check=False)
        assert second.returncode != 0 and "exists already" in second.stdout + second.stderr

        # the original runs on, replicated: its writes reach the replica, not the copy
        write_records(lab, "h1", "tf1", range(4, 6))
        assert lab.running_on(vm_uuid) == ["h1"]
        assert status(lab, "h1", "tf1")["state"] == "in-sync"
        assert {4, 5}.isdisjoint(read_records(lab, "h2", "tf1-test", 8))

        lab.on("h1", "vm", "replication", "failover", "tf1", "--test-stop")
        assert lab.on("h1", "vm", "show", "tf1-test", check=False).returncode != 0
        assert "tf1-test" not in _switches(lab, "h2")
        assert lab.running_on(test_uuid) == []
        assert status(lab, "h1", "tf1")["state"] == "in-sync"
        assert lab.running_on(vm_uuid) == ["h1"]


def _switches(lab, host: str) -> dict[str, dict]:
    listed = json.loads(lab.on(host, "switch", "list", "--json").stdout)
    return {s["definition"]["name"]: s for s in listed}
