#!/usr/bin/env python3
"""Service footprint: idle RSS of ``parvisor host serve`` and ``GET /v1/vms`` latency.

(a) VmRSS of the service process (``/proc/PID/status``) after start-up with no VMs,
    with 10 defined VMs and with 1,000 defined VMs (each after one ``GET /v1/vms`` and a
    1 s settle). Target <= 80 MiB; prints the ratio RSS / target.
(b) ``GET /v1/vms`` latency with 1,000 defined VMs (created through ``POST /v1/vms``
    with kernel boot, never started), timed around an httpx call on the API's unix socket
    in this process, median of --runs (default 11) after one warm-up. Baselines from the
    same run: the same list with 10 VMs, and ``GET /v1/jobs`` (a trivial endpoint).
    Target <= 100 ms; prints the ratios.

Run as root from the project root:

    sudo .venv/bin/python bench/service_footprint.py [--runs 11] [--vms 1000]

Starts its own service on a temp state dir under /tmp, stops it by PID and removes the
state dir. No QEMU is started.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _service import Service, median, rss_mib, running_service

RSS_TARGET_MIB = 80.0
LIST_TARGET_MS = 100.0


def cpu_ms(pid: int) -> float:
    """utime + stime of ``pid`` so far, in ms (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def latency_ms(svc: Service, path: str, runs: int) -> tuple[float, float]:
    """(median wall ms at the client, mean service CPU ms per request)."""
    svc.api.get(f"/v1{path}").raise_for_status()            # warm-up
    times = []
    cpu0 = cpu_ms(svc.pid)
    for _ in range(runs):
        t0 = time.perf_counter()
        svc.api.get(f"/v1{path}").raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return median(times), (cpu_ms(svc.pid) - cpu0) / runs


def define_vms(svc: Service, first: int, last: int) -> None:
    tiny = svc.state_dir / "images" / "tiny"
    for i in range(first, last):
        svc.call("POST", "/vms", json={"name": f"vm{i:04d}", "kernel": str(tiny / "vmlinuz"),
                                       "initrd": str(tiny / "initrd.img"), "memory": "256M"})


def settled_rss(svc: Service) -> float:
    svc.call("GET", "/vms")
    time.sleep(1)
    return rss_mib(svc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="timed requests each (>= 5)")
    parser.add_argument("--vms", type=int, default=1000, help="VMs for the big list")
    args = parser.parse_args()
    runs = max(5, args.runs)
    with running_service() as svc:
        rss = {0: settled_rss(svc)}
        define_vms(svc, 0, 10)
        rss[10] = settled_rss(svc)
        trivial_ms, _ = latency_ms(svc, "/jobs", runs)
        list10_ms, _ = latency_ms(svc, "/vms", runs)
        t0 = time.perf_counter()
        define_vms(svc, 10, args.vms)
        create_s = time.perf_counter() - t0
        rss[args.vms] = settled_rss(svc)
        list_big_ms, list_big_cpu = latency_ms(svc, "/vms", runs)
        count = len(svc.call("GET", "/vms"))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f" on {os.cpu_count()} CPUs (other load inflates the latencies below)")
    print(f"(a) service RSS (VmRSS), target <= {RSS_TARGET_MIB:.0f} MiB:")
    for vms, mib in rss.items():
        verdict = "MET" if mib <= RSS_TARGET_MIB else "MISSED"
        print(f"  {vms:>5} defined VMs: {mib:6.1f} MiB  ratio to target {mib / RSS_TARGET_MIB:.2f}"
              f"  {verdict}")
    print(f"(b) GET /v1/vms latency, median of {runs} (httpx on the unix socket):")
    print(f"  {count} VMs: {list_big_ms:7.1f} ms   (creating {args.vms - 10} VMs took"
          f" {create_s:.1f} s, {create_s * 1000 / (args.vms - 10):.1f} ms each)")
    print(f"  service CPU time per {count}-VM list: {list_big_cpu:.0f} ms"
          " (utime+stime, 10 ms ticks, mean over the runs)")
    print(f"  10 VMs:   {list10_ms:7.1f} ms   ratio {count}/10: {list_big_ms / list10_ms:.1f}")
    print(f"  GET /v1/jobs (trivial): {trivial_ms:5.1f} ms   ratio list/trivial:"
          f" {list_big_ms / trivial_ms:.1f}")
    print(f"  target <= {LIST_TARGET_MS:.0f} ms with {count} VMs: ratio to target"
          f" {list_big_ms / LIST_TARGET_MS:.2f}  "
          + ("MET" if list_big_ms <= LIST_TARGET_MS else "MISSED"))


if __name__ == "__main__":
    main()
