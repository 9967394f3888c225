#!/usr/bin/env python3
"""Network throughput between two VMs on one private switch: synthetic (virtio-net)
versus emulated (e1000) adapters, same guests, same switch, same run.

Per model: two tiny VMs get static addresses (the tiny guest runs Debian's cloud kernel,
which has virtio drivers but no e1000 driver: the e1000 half reports that instead of a
figure; with a guest kernel that has e1000 both are measured); VM b listens with busybox ``nc -l`` and
discards, VM a pipes 64 MiB from /dev/zero into ``nc``; the time is read in VM a from
/proc/uptime around the transfer (busybox nc closes at end of input, so the last
socket-buffer's worth may still be in flight: small against 64 MiB). Median of ROUNDS
transfers per model; prints MiB/s for both and the virtio/e1000 ratio.

Usage: .venv/bin/python bench/network.py [ROUNDS]    (default 5)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _service import running_service  # noqa: E402

SWITCH = "benchnet"
MIB = 64
SEND = (f"t() {{ cut -d' ' -f1 /proc/uptime; }}; a=$(t); "
        f"dd if=/dev/zero bs=64k count={MIB * 16} 2>/dev/null | nc PEER 5001; "
        "b=$(t); echo $a $b")


def guest(service, vm: str, script: str) -> str:
    result = service.call("POST", f"/vms/{vm}/exec",
                          json={"argv": ["sh", "-c", script], "timeout_s": 300})
    if result["exit_code"] != 0:
        raise RuntimeError(f"{vm}: {script!r} failed: {result['stderr']}")
    return result["stdout"]


def wait_agent(service, vm: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while service.call("GET", f"/vms/{vm}")["heartbeat"] != "ok":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm}: guest agent did not answer")
        time.sleep(0.2)


class GuestLacksDriver(RuntimeError):
    pass


def has_nic(service, vm: str) -> bool:
    return "eth0" in guest(service, vm, "ls /sys/class/net")


def pair(service, model: str, subnet: int) -> tuple[str, str]:
    names = (f"a-{model}", f"b-{model}")
    for index, name in enumerate(names, start=1):
        service.call("POST", "/vms", json={"name": name, "image": "tiny",
                                           "nics": [{"switch": SWITCH, "model": model}]})
        service.call("POST", f"/vms/{name}/start")
        wait_agent(service, name)
        if not has_nic(service, name):
            # Debian's cloud kernel (the tiny guest) ships virtio drivers only, no e1000
            raise GuestLacksDriver(f"the guest kernel has no driver for a {model} NIC")
        guest(service, name, f"ip addr add 10.66.{subnet}.{index}/24 dev eth0 && "
                             "ip link set eth0 up")
    return names


def transfer(service, sender: str, receiver: str, peer: str) -> float:
    guest(service, receiver, "nc -l -p 5001 > /dev/null 2>&1 &")
    time.sleep(0.3)  # let the listener bind; a refused connect would only fail the round
    start, end = map(float, guest(service, sender, SEND.replace("PEER", peer)).split())
    return MIB / max(0.01, end - start)


def main(rounds: int) -> None:
    results: dict[str, float] = {}
    with running_service() as service:
        service.call("POST", "/switches", json={"name": SWITCH, "type": "private"})
        try:
            for subnet, model in enumerate(("virtio", "e1000"), start=1):
                try:
                    sender, receiver = pair(service, model, subnet)
                except GuestLacksDriver as exc:
                    print(f"{model}: not measurable with this guest: {exc}")
                    continue
                rates = [transfer(service, sender, receiver, f"10.66.{subnet}.2")
                         for _ in range(rounds)]
                results[model] = statistics.median(rates)
                for vm in (sender, receiver):
                    service.call("DELETE", f"/vms/{vm}", params={"force": "true"})
        finally:
            for vm in service.call("GET", "/vms"):
                service.call("DELETE", f"/vms/{vm['name']}", params={"force": "true"})
            service.call("DELETE", f"/switches/{SWITCH}")
    print(f"median of {rounds} transfers of {MIB} MiB between two VMs on a private switch")
    for model, rate in results.items():
        print(f"{model:<8}{rate:>8.1f} MiB/s")
    if len(results) == 2:
        print(f"virtio / e1000 = {results['virtio'] / results['e1000']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
