"""Disk I/O inside the tiny guest: parvisor's disk defaults vs QEMU's plain
``-drive file=…,if=virtio`` (same guest, same image file, same run).

What is measured (busybox in the guest; fio is not in the tiny image): sequential write
and read of 192 MiB with ``dd bs=1M oflag=direct/iflag=direct`` on /dev/vda, and 4 KiB
random write/read as 200 single-block ``dd`` calls at random offsets (under TCG this is
dominated by process start-up in the guest, so expect a ratio near 1). Time is taken in
the guest from /proc/uptime. Parvisor's run goes through the API (`vm exec`); the baseline starts
the *same* QEMU command line with the data disk's -blockdev/-device pair replaced by
``-drive file=PATH,if=virtio,format=qcow2`` (format given: probing is unsafe) and talks
to the same guest agent socket. Prints MiB/s or IOPS and baseline/parvisor ratios.

Usage: .venv/bin/python bench/disk_io.py [ROUNDS]   (default 5, alternating)
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _service import kill_pid, running_service  # noqa: E402

from parvisor.guest.agent import GuestAgent  # noqa: E402

WORKLOAD = r"""
t() { cut -d' ' -f1 /proc/uptime; }
a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count=192 oflag=direct 2>/dev/null; b=$(t)
echo seq_write $a $b
a=$(t); dd if=/dev/vda of=/dev/null bs=1M count=192 iflag=direct 2>/dev/null; b=$(t)
echo seq_read $a $b
a=$(t); i=0; while [ $i -lt 200 ]; do
  dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=$((RANDOM % 16384)) oflag=direct 2>/dev/null
  i=$((i+1)); done; b=$(t)
echo rand_write $a $b
a=$(t); i=0; while [ $i -lt 200 ]; do
  dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$((RANDOM % 16384)) iflag=direct 2>/dev/null
  i=$((i+1)); done; b=$(t)
echo rand_read $a $b
"""
UNITS = {"seq_write": 192.0, "seq_read": 192.0, "rand_write": 200.0, "rand_read": 200.0}


def parse(stdout: str) -> dict[str, float]:
    """Throughput per test: MiB/s for sequential, IOPS for random."""
    result = {}
    for line in stdout.splitlines():
        name, start, end = line.split()
        result[name] = UNITS[name] / max(0.01, float(end) - float(start))
    return result


async def run_in_guest(socket: Path, timeout: float = 120) -> dict[str, float]:
    agent = GuestAgent(socket)
    deadline = time.monotonic() + timeout
    while True:                                # the agent answers once the guest is up
        try:
            await agent.ping()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    # The first pass allocates qcow2 clusters and warms the guest: only the second counts
    # (otherwise whichever configuration runs first pays for allocation).
    await agent.exec(["sh", "-c", WORKLOAD], timeout=600)
    done = await agent.exec(["sh", "-c", WORKLOAD], timeout=600)
    return parse(done.stdout.decode())


def baseline_argv(argv: list[str], disk: str) -> list[str]:
    """The same command line with disk0 as QEMU's plain -drive (its defaults)."""
    out, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if arg in ("-blockdev", "-device") and "disk0" in following:
            skip = True
            continue
        out.append(arg)
    return out + ["-drive", f"file={disk},if=virtio,format=qcow2"]


def parvisor_round(service) -> tuple[dict[str, float], list[str], str, Path]:
    service.call("POST", "/vms/bench/start")
    vm = service.call("GET", "/vms/bench")
    argv = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().decode().split("\0")[:-1]
    disk = next(d["path"] for d in vm["disks"] if d["id"] == "disk0")
    qga = service.state_dir / "vms" / vm["uuid"] / "qga.sock"
    try:
        return api_run(service), argv, disk, qga
    finally:
        service.call("POST", "/vms/bench/turn-off")


def api_run(service) -> dict[str, float]:
    """parvisor's VM through the API (`vm exec`): the service owns the agent socket."""
    deadline = time.monotonic() + 120
    while service.call("GET", "/vms/bench")["heartbeat"] != "ok":
        if time.monotonic() > deadline:
            raise RuntimeError("the guest agent did not answer")
        time.sleep(0.2)
    body = {"argv": ["sh", "-c", WORKLOAD], "timeout_s": 600}
    service.call("POST", "/vms/bench/exec", json=body)          # warm-up pass
    return parse(service.call("POST", "/vms/bench/exec", json=body)["stdout"])


def plain_round(argv: list[str], disk: str, qga: Path) -> dict[str, float]:
    plain = subprocess.Popen(baseline_argv(argv, disk), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not qga.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return asyncio.run(run_in_guest(qga))
    finally:
        kill_pid(plain.pid)


def main(rounds: int = 5) -> None:
    """Alternate the two configurations ``rounds`` times; report medians."""
    ours: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    with running_service() as service:
        service.call("POST", "/vms", json={"name": "bench", "image": "tiny",
                                           "new_disks": [{"size": "256M"}]})
        for _ in range(rounds):
            result, argv, disk, qga = parvisor_round(service)
            ours.append(result)
            base.append(plain_round(argv, disk, qga))
    print(f"median of {rounds} alternating rounds")
    print(f"{'test':<12}{'parvisor':>12}{'plain -drive':>14}{'ratio':>8}")
    for name, unit in (("seq_write", "MiB/s"), ("seq_read", "MiB/s"),
                       ("rand_write", "IOPS"), ("rand_read", "IOPS")):
        mine = statistics.median(r[name] for r in ours)
        theirs = statistics.median(r[name] for r in base)
        print(f"{name:<12}{mine:>9.1f} {unit:<5}{theirs:>8.1f} {unit:<5}{mine / theirs:>6.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
