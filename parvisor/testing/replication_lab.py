"""Helpers for replication tests in the lab (tests/integration/test_replication_lab.py,
tests/slow/test_replication_faults.py): a replicated tiny VM, numbered guest records,
waiting on ``vm replication status --json``.

The guest writes numbered 4 KiB records to its replicated disk (``/dev/vda``) with
``O_DIRECT`` and ``fsync``, one ``vm exec`` per record: a record whose exec returned is
*acknowledged*. Every wait polls a condition with a timeout (``LabUnderTest.wait``,
which also checks INV-1 at each poll).
"""

from __future__ import annotations

import json
import re
import threading
import time

from parvisor.testing.lab_fixture import LabUnderTest

# readiness polls (not deadlines): TCG guests on a loaded 2-core box
BOOT_S = 120
SYNC_S = 120
FAILOVER_S = 60      # lease TTL 8 s + grace + boot
STALL_LIMIT_S = 3
RECORD = re.compile(r"rec (\d+)")


def record_script(n: int) -> str:
    """Write record ``n``; prints the guest's uptime before and after (1/100 s), so a
    write's own duration is known without the exec round trip around it."""
    return ("a=$(cut -d' ' -f1 /proc/uptime); "
            f"printf '%-4095s\\n' 'rec {n}' | dd of=/dev/vda bs=4096 seek={n} count=1 "
            "oflag=direct conv=fsync 2>/dev/null && "
            "echo $a $(cut -d' ' -f1 /proc/uptime)")


def guest_seconds(output: str) -> float:
    start, end = (float(x) for x in output.split()[-2:])
    return end - start


def read_records(lab: LabUnderTest, host: str, vm: str, upto: int) -> set[int]:
    out = lab.on(host, "vm", "exec", vm, "--", "sh", "-c",
                 f"dd if=/dev/vda bs=4096 count={upto + 1} iflag=direct 2>/dev/null "
                 "| tr -d '\\000'").stdout
    return {int(n) for n in RECORD.findall(out)}


def status(lab: LabUnderTest, host: str, vm: str) -> dict:
    done = lab.on(host, "vm", "replication", "status", vm, "--json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def wait_state(lab: LabUnderTest, host: str, vm: str, state: str, timeout: float,
               **fields: str) -> dict:
    def reached() -> dict | None:
        current = status(lab, host, vm)
        ok = current.get("state") == state and all(current.get(k) == v
                                                   for k, v in fields.items())
        return current if ok else None
    return lab.wait(reached, timeout, f"replication of {vm} {state} {fields}", interval=0.5)


def wait_guest(lab: LabUnderTest, host: str, vm: str) -> None:
    lab.wait(lambda: lab.on(host, "vm", "exec", vm, "--", "true", check=False)
             .returncode == 0, BOOT_S, f"the guest agent of {vm} on {host}", interval=0.5)


class Writer(threading.Thread):
    """Writes records first, first+1, … through ``host``'s CLI until a write fails or
    ``stop`` is set; ``acked`` holds those whose exec returned success, ``acked_at``
    the wall time of each acknowledgement, ``spans`` each write's (start, end) on the
    monotonic clock."""

    def __init__(self, lab: LabUnderTest, host: str, vm: str, first: int) -> None:
        super().__init__(daemon=True)
        self.lab, self.host, self.vm, self.next = lab, host, vm, first
        self.acked: list[int] = []
        self.acked_at: list[float] = []
        self.spans: list[tuple[float, float]] = []
        self.guest_s: list[float] = []     # each write's duration inside the guest
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            done = self.lab.on(self.host, "vm", "exec", self.vm, "--", "sh", "-c",
                               record_script(self.next), check=False)
            if done.returncode != 0:
                return
            self.acked_at.append(time.time())
            self.spans.append((started, time.monotonic()))
            self.guest_s.append(guest_seconds(done.stdout))
            self.acked.append(self.next)
            self.next += 1

    def durations_since(self, moment: float) -> list[float]:
        """How long each write whose exec ended after ``moment`` (monotonic) took in
        the guest."""
        return [took for (_, end), took in zip(self.spans, self.guest_s) if end > moment]


def write_records(lab: LabUnderTest, host: str, vm: str, numbers: range) -> None:
    for n in numbers:
        lab.on(host, "vm", "exec", vm, "--", "sh", "-c", record_script(n))


def make_vm(lab: LabUnderTest, vm: str, *replication: str) -> str:
    lab.on("h1", "vm", "create", vm, "--image", "tiny", "--ha", "--memory", "128M",
           "--disk-size", "32M")
    vm_uuid = lab.vm_uuid("h1", vm)
    lab.on("h1", "vm", "start", vm)
    lab.wait(lambda: lab.running_on(vm_uuid) == ["h1"], 60, f"{vm} to run on h1")
    wait_guest(lab, "h1", vm)
    shown = json.loads(lab.on("h2", "vm", "show", vm, "--json").stdout)
    assert shown["ha_status"] == "not protected: disks on local storage", shown
    lab.on("h1", "vm", "replication", "enable", vm, *replication)
    return vm_uuid
