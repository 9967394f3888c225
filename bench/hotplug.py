"""Hot-add latency: from the API call to the guest seeing the resource, per kind.

One tiny TCG guest; for each kind (vCPU, 128 MiB of virtio-mem, a virtio-blk disk, a
virtio-net NIC on a private switch) ROUNDS hot-adds, each timed from the HTTP call
until a ``vm exec`` in the guest sees it (online CPU count, MemTotal, /sys/block,
/sys/class/net), undone between rounds where that works (vCPUs are not removed under
TCG, see docs/hot-add.md, so the VM has 8 slots). Baseline in the same run: a no-op
``vm exec true`` round trip, the floor of any guest-observed measurement. Prints
medians and ratios to the baseline. Usage: ``.venv/bin/python bench/hotplug.py``.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _service import Service, median, running_service  # noqa: E402

ROUNDS = 5


def guest(service: Service, script: str) -> str:
    return service.call("POST", "/vms/hp/exec", json={"argv": ["sh", "-c", script]})["stdout"]


def timed_until(service: Service, act, check) -> float:
    """Seconds from ``act()`` (the API call) until ``check()`` holds in the guest."""
    start = time.monotonic()
    act()
    while not check():
        if time.monotonic() - start > 60:
            raise RuntimeError("the guest never saw the resource")
    return time.monotonic() - start


def baseline(service: Service) -> list[float]:
    times = []
    for _ in range(ROUNDS * 2):
        start = time.monotonic()
        guest(service, "true")
        times.append(time.monotonic() - start)
    return times


def cpus(service: Service) -> list[float]:
    times = []
    for n in range(2, 2 + ROUNDS):
        times.append(timed_until(
            service, lambda: service.call("PATCH", "/vms/hp", json={"vcpus": n}),
            lambda: int(guest(service, "grep -c ^processor /proc/cpuinfo")) == n))
    return times


def memory(service: Service) -> list[float]:
    def total() -> int:
        return int(guest(service, "awk '/MemTotal/ {print $2}' /proc/meminfo"))
    times = []
    for _ in range(ROUNDS):
        before = total()
        times.append(timed_until(
            service, lambda: service.call("PATCH", "/vms/hp", json={"memory": "384M"}),
            lambda: total() >= before + 100 * 1024))
        service.call("PATCH", "/vms/hp", json={"memory": "256M"})
    return times


def disks(service: Service) -> list[float]:
    times = []
    for _ in range(ROUNDS):
        before = guest(service, "ls /sys/block").split()
        added = {}
        times.append(timed_until(
            service, lambda: added.update(service.call("POST", "/vms/hp/disks",
                                                       json={"size": "16M"})["disk"]),
            lambda: len(guest(service, "ls /sys/block").split()) > len(before)))
        service.call("DELETE", f"/vms/hp/disks/{added['id']}")
    return times


def nics(service: Service) -> list[float]:
    switch = f"bh{secrets.token_hex(3)}"
    service.call("POST", "/switches", json={"name": switch, "type": "private"})
    times = []
    try:
        for _ in range(ROUNDS):
            added = {}
            times.append(timed_until(
                service, lambda: added.update(service.call(
                    "POST", "/vms/hp/nics", json={"switch": switch})["nic"]),
                lambda: "eth" in guest(service, "ls /sys/class/net")))
            service.call("DELETE", f"/vms/hp/nics/{added['id']}")
    finally:
        service.call("DELETE", f"/switches/{switch}")
    return times


def main() -> None:
    with running_service() as service:
        service.call("POST", "/vms", json={"name": "hp", "image": "tiny", "vcpus": 1,
                                           "max_vcpus": 8, "memory": "256M",
                                           "max_memory": "1G"})
        service.call("POST", "/vms/hp/start")
        deadline = time.monotonic() + 60
        while service.call("GET", "/vms/hp")["heartbeat"] != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("guest agent never answered")
            time.sleep(0.1)
        base = median(baseline(service))
        print(f"baseline  vm exec true round trip: {base * 1000:7.1f} ms (median of "
              f"{ROUNDS * 2})")
        for kind, run in (("vcpu", cpus), ("memory", memory), ("disk", disks),
                          ("nic", nics)):
            value = median(run(service))
            print(f"{kind:<8}  API call -> guest sees it:   {value * 1000:7.1f} ms "
                  f"(median of {ROUNDS})  ratio {value / base:5.1f}x")


if __name__ == "__main__":
    main()
