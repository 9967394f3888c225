#!/usr/bin/env python3
"""Network throughput between two VMs on one private switch: synthetic (virtio-net)
versus emulated (e1000) adapters, same guests, same switch, same run.

Both models run the same guest: the tiny image's *generic* flavour (Debian's generic
kernel, whose initramfs also loads e1000; the default tiny guest runs the cloud kernel,
which has no e1000 driver), built once into the shared test image dir and copied into
the service's storage root. Per model: two VMs get static addresses; VM b listens with
busybox ``nc -l -e`` handing the connection to ``dd``, VM a connects with ``nc -e`` and
``dd`` writes MIB MiB of zeros into the socket (64 KiB writes: busybox nc's own 1 KiB
copy loop would cap any NIC at ~1 MiB/s under TCG). The time is taken in VM b, from
the first byte received to the last, and dd's record count must show every byte, so a
refused or cut connection fails the round instead of looking fast. Median of ROUNDS
transfers per model; prints each transfer, MiB/s for both and the ratio.

Usage: .venv/bin/python bench/network.py [ROUNDS]    (default 5)
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _service import running_service  # noqa: E402

from parvisor.image.tiny import TinyImage, build_tiny_image  # noqa: E402
from parvisor.testing.guest_fixtures import test_image_dir  # noqa: E402

SWITCH = "benchnet"
MIB = 128
FIRST_PORT = 5001           # one port per round: an old listener never answers a new one
BYTES = MIB << 20
# busybox nc copies through a 1 KiB buffer, which under TCG caps a stream at ~1 MiB/s
# whatever the NIC: with -e it only connects and hands the socket to dd (64 KiB I/O).
# Timed in VM b from the first byte to the last (dd stops at exactly BYTES); dd's
# "records in" line shows that every byte arrived.
RECEIVE = ('t() { cut -d" " -f1 /proc/uptime; }; dd bs=1 count=1 of=/dev/null 2>/dev/null; '
           f"a=$(t); dd bs=64k count={BYTES - 1} iflag=count_bytes,fullblock of=/dev/null "
           "2>/tmp/dd.err; b=$(t); echo $a $b $(head -n 1 /tmp/dd.err) > /tmp/received")
LISTEN = (f"rm -f /tmp/received; (nc -l -p PORT -e sh -c '{RECEIVE}') </dev/null "
          ">/dev/null 2>&1 &")
SEND = f"nc -w 10 PEER PORT -e dd if=/dev/zero bs=64k count={MIB * 16}"
# what dd reports for BYTES - 1 bytes in 64 KiB blocks (fullblock: one partial at most)
RECORDS_IN = f"{(BYTES - 1) // 65536}+{int((BYTES - 1) % 65536 > 0)}"


def listening(port: int) -> re.Pattern:
    # /proc/net/tcp{,6}: local :PORT (hex), no peer, state 0A = LISTEN (busybox nc
    # listens on an IPv6 socket where the kernel has IPv6)
    return re.compile(rf":{port:04X} 0+:0000 0A ")


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


def generic_guest() -> TinyImage:
    """The generic-kernel tiny image, built (once) next to the shared test image."""
    return build_tiny_image(test_image_dir(), kernel="generic",
                            progress=lambda _, message: print(f"  image: {message}"))


def install_guest(service, image: TinyImage) -> dict:
    """Copy the kernel + initrd into the service's storage root: a --kernel VM's files
    must live there. Returns the boot fields of a create request."""
    target = service.state_dir / "storage" / "generic"
    target.mkdir(parents=True, exist_ok=True)
    for source in (image.kernel, image.initrd):
        shutil.copyfile(source, target / source.name)
    return {"kernel": str(target / image.kernel.name),
            "initrd": str(target / image.initrd.name), "cmdline": image.cmdline}


def pair(service, boot: dict, model: str, subnet: int) -> tuple[str, str]:
    names = (f"a-{model}", f"b-{model}")
    for index, name in enumerate(names, start=1):
        service.call("POST", "/vms", json={"name": name, **boot,
                                           "nics": [{"switch": SWITCH, "model": model}]})
        service.call("POST", f"/vms/{name}/start")
        wait_agent(service, name)
        if not has_nic(service, name):
            raise GuestLacksDriver(f"the guest kernel has no driver for a {model} NIC")
        guest(service, name, f"ip addr add 10.66.{subnet}.{index}/24 dev eth0 && "
                             "ip link set eth0 up")
    return names


def poll(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def received(service, vm: str) -> list[str]:
    """[first byte time, last byte time, dd's "N+M" records in] once VM b is done."""
    return guest(service, vm, "cat /tmp/received 2>/dev/null || true").split()


def transfer(service, sender: str, receiver: str, peer: str, port: int) -> float:
    guest(service, receiver, LISTEN.replace("PORT", str(port)))
    poll(lambda: listening(port).search(guest(service, receiver, "cat /proc/net/tcp*")),
         60, f"{receiver} to listen")
    guest(service, sender, SEND.replace("PEER", peer).replace("PORT", str(port)))
    # the receiver writes its times only once it has every byte
    poll(lambda: len(received(service, receiver)) >= 3, 120, f"{receiver} to get {MIB} MiB")
    start, end, records = received(service, receiver)[:3]
    if records != RECORDS_IN:    # the connection ended early
        raise RuntimeError(f"{receiver} read {records} blocks, expected {RECORDS_IN}")
    return MIB / max(0.01, float(end) - float(start))


def main(rounds: int) -> None:
    results: dict[str, float] = {}
    image = generic_guest()
    with running_service() as service:
        boot = install_guest(service, image)
        service.call("POST", "/switches", json={"name": SWITCH, "type": "private"})
        try:
            for subnet, model in enumerate(("virtio", "e1000"), start=1):
                try:
                    sender, receiver = pair(service, boot, model, subnet)
                except GuestLacksDriver as exc:
                    print(f"{model}: not measurable with this guest: {exc}")
                    continue
                rates = [transfer(service, sender, receiver, f"10.66.{subnet}.2",
                                  FIRST_PORT + round_) for round_ in range(rounds)]
                print(f"{model}: " + ", ".join(f"{rate:.0f}" for rate in rates) + " MiB/s")
                results[model] = statistics.median(rates)
                for vm in (sender, receiver):
                    service.call("DELETE", f"/vms/{vm}", params={"force": "true"})
        finally:
            for vm in service.call("GET", "/vms"):
                service.call("DELETE", f"/vms/{vm['name']}", params={"force": "true"})
            service.call("DELETE", f"/switches/{SWITCH}")
    print(f"median of {rounds} transfers of {MIB} MiB between two VMs on a private switch"
          f" (guest kernel {image.kernel_release}; load average {os.getloadavg()[0]:.1f})")
    for model, rate in results.items():
        print(f"{model:<8}{rate:>8.1f} MiB/s")
    if len(results) == 2:
        print(f"virtio / e1000 = {results['virtio'] / results['e1000']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
