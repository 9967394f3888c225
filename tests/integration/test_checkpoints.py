"""Checkpoints end to end with real QEMU (TCG) and qcow2 internal snapshots.

One VM (tiny guest, /dev/vda = its 64M data disk) carries the chain: c1 (stopped) ->
c2 (running, disks only) -> c3 (running, with memory). The middle one is deleted, and
then c1 and c3 are both applied and show the right data; a with-memory apply brings a
running process back.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.qemu


def guest(host, name: str, script: str) -> str:
    return host.cli("vm", "exec", name, "--", "sh", "-c", script).stdout


def write(host, name: str, text: str) -> None:
    guest(host, name, f"echo {text} | dd of=/dev/vda bs=512 count=1 conv=sync,fsync "
                      "2>/dev/null")


def read(host, name: str) -> str:
    return guest(host, name, "dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null "
                             "| tr -d '\\000'").strip()


def test_checkpoint_chain_memory_and_middle_delete(host):
    host.create_tiny("ck", "--disk-size", "64M")
    host.cli("vm", "checkpoint", "create", "ck", "c1")                       # off: empty
    host.cli("vm", "start", "ck")
    host.wait_agent("ck")
    write(host, "ck", "two")
    host.cli("vm", "checkpoint", "create", "ck", "c2")                       # live, disks
    write(host, "ck", "three")
    pid = guest(host, "ck", "sleep 1000 >/dev/null 2>&1 & echo $!").strip()
    guest(host, "ck", "echo kept > /tmp/mem")
    host.cli("vm", "checkpoint", "create", "ck", "c3", "--with-memory")
    guest(host, "ck", f"kill {pid}; rm /tmp/mem")
    write(host, "ck", "later")

    tree = host.json("vm", "checkpoint", "list", "ck")
    by_name = {c["name"]: c for c in tree["checkpoints"]}
    assert by_name["c2"]["parent"] == by_name["c1"]["id"]
    assert by_name["c3"]["parent"] == by_name["c2"]["id"] and by_name["c3"]["current"]

    host.cli("vm", "checkpoint", "delete", "ck", "c2")                       # the middle
    tree = host.json("vm", "checkpoint", "list", "ck")
    assert [c["name"] for c in tree["checkpoints"]] == ["c1", "c3"]
    assert tree["checkpoints"][1]["parent"] == tree["checkpoints"][0]["id"]

    host.cli("vm", "checkpoint", "apply", "ck", "c3")                        # live load
    assert host.state("ck") == "running"
    host.wait_agent("ck")
    assert read(host, "ck") == "three"
    assert guest(host, "ck", "cat /tmp/mem").strip() == "kept"
    assert guest(host, "ck", f"test -d /proc/{pid} && echo alive").strip() == "alive"

    host.cli("vm", "checkpoint", "apply", "ck", "c1")          # disks only: ends off
    assert host.state("ck") == "off"
    host.cli("vm", "start", "ck")
    host.wait_agent("ck")
    assert read(host, "ck") == ""                              # c1 was the empty disk
    host.cli("vm", "turn-off", "ck")
    host.cli("vm", "checkpoint", "apply", "ck", "c3")          # memory from a stopped VM
    host.wait_agent("ck")
    assert read(host, "ck") == "three"
    assert guest(host, "ck", f"test -d /proc/{pid} && echo alive").strip() == "alive"
    current = [c["name"] for c in host.json("vm", "checkpoint", "list", "ck")["checkpoints"]
               if c["current"]]
    assert current == ["c3"]


def test_checkpoint_bad_input_changes_nothing(host):
    host.create_tiny("ca", "--disk-size", "16M")
    host.create_tiny("cb", "--disk-size", "16M")
    host.cli("vm", "checkpoint", "create", "ca", "first")
    before = host.json("vm", "checkpoint", "list", "cb")
    refused = host.cli("vm", "checkpoint", "apply", "cb", "first", check=False)
    assert refused.returncode == 1 and "belongs to VM 'ca'" in refused.stderr
    refused = host.cli("vm", "checkpoint", "create", "ca", "a/b", check=False)
    assert refused.returncode == 1 and "not allowed" in refused.stderr
    refused = host.cli("vm", "checkpoint", "create", "ca", "first", check=False)
    assert refused.returncode == 1 and "already has" in refused.stderr
    refused = host.cli("vm", "checkpoint", "create", "ca", "--with-memory", check=False)
    assert refused.returncode == 1 and "no running memory" in refused.stderr
    assert host.json("vm", "checkpoint", "list", "cb") == before
    assert len(host.json("vm", "checkpoint", "list", "ca")["checkpoints"]) == 1
    host.cli("vm", "delete", "ca")                      # its checkpoints go with it
