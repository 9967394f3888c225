#!/usr/bin/env python3
"""Start latency: ``vm start`` through the service versus the same QEMU started by hand.

Measures the time from the start request to the guest's first userspace line
(``parvisor-guest: userspace ready``) in its serial console log, two ways, alternating:

* parvisor: ``POST /v1/vms/bench/start`` on the running service's API (httpx on the unix
  socket), then poll ``<state>/vms/<uuid>/console.log`` every 5 ms;
* baseline: the *same* argv (``parvisor.vm.argv.build_argv`` for the same definition,
  with the runtime paths moved to ``<state>/hand/``) spawned with ``subprocess.Popen``
  the way the service spawns it (own session, output to a log file), same polling.

Both boot the tiny image (Debian cloud kernel + busybox initramfs), 256 MiB, 1 vCPU.
One unmeasured warm-up run of each comes first. Prints both medians (of --runs, default
7), the difference and the ratio. Target: parvisor adds <= 10 % or <= 150 ms (met when
the difference is within the larger of the two).

Run as root from the project root:

    sudo .venv/bin/python bench/start_latency.py [--runs 7]

Starts its own service on a temp state dir under /tmp; every QEMU is stopped through the
API or by PID, the service by PID, and the state dir is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from _service import READY_LINE, Service, kill_pid, median, running_service

from parvisor.model.vm import VmDefinition
from parvisor.vm.argv import LaunchSpec, build_argv
from parvisor.vm.paths import VmPaths

VM = "bench"
POLL_S = 0.005
BOOT_TIMEOUT_S = 180
TARGET_RATIO, TARGET_MS = 1.10, 150.0


def wait_for_ready(console: Path, offset: int, t0: float) -> float:
    """Seconds from t0 until READY_LINE appears in ``console`` after ``offset``."""
    seen = b""
    while time.monotonic() - t0 < BOOT_TIMEOUT_S:
        try:
            with console.open("rb") as f:
                f.seek(offset + len(seen))
                seen += f.read()
        except FileNotFoundError:
            pass
        if READY_LINE in seen:
            return time.monotonic() - t0
        time.sleep(POLL_S)
    raise RuntimeError(f"no {READY_LINE!r} in {console} within {BOOT_TIMEOUT_S} s")


def run_parvisor(svc: Service, console: Path) -> float:
    offset = console.stat().st_size if console.exists() else 0   # logappend=on
    t0 = time.monotonic()
    svc.call("POST", f"/vms/{VM}/start")
    elapsed = wait_for_ready(console, offset, t0)
    svc.call("POST", f"/vms/{VM}/turn-off")
    return elapsed


def run_by_hand(argv: list[str], paths: VmPaths) -> float:
    shutil.rmtree(paths.root, ignore_errors=True)
    paths.root.mkdir(parents=True, mode=0o700)
    with paths.stderr_log.open("ab") as out:
        t0 = time.monotonic()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True)
    try:
        return wait_for_ready(paths.console_log, 0, t0)
    finally:
        kill_pid(child.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each (>= 5)")
    runs = max(5, parser.parse_args().runs)
    with running_service() as svc:
        status = svc.call("POST", "/vms", json={"name": VM, "image": "tiny", "memory": "256M"})
        definition = VmDefinition.model_validate(
            {k: status[k] for k in ("name", "uuid", "vcpus", "max_vcpus", "memory_bytes",
                                    "max_memory_bytes", "boot")})
        console = VmPaths(svc.state_dir, status["uuid"]).console_log
        hand_paths = VmPaths(svc.state_dir / "hand", status["uuid"])
        argv = build_argv(LaunchSpec(definition=definition, paths=hand_paths,
                                     accelerator=status["accelerator"]))
        print(f"guest: tiny image, {status['memory_bytes'] >> 20} MiB, {status['vcpus']} vCPU,"
              f" accelerator {status['accelerator']}")
        print("baseline argv (build_argv, same definition):", " ".join(argv))
        run_parvisor(svc, console), run_by_hand(argv, hand_paths)    # warm-up, not counted
        times: dict[str, list[float]] = {"parvisor": [], "by hand": []}
        for i in range(runs):
            order = ("parvisor", "by hand") if i % 2 == 0 else ("by hand", "parvisor")
            for which in order:
                elapsed = (run_parvisor(svc, console) if which == "parvisor"
                           else run_by_hand(argv, hand_paths))
                times[which].append(elapsed)
                print(f"run {i + 1}/{runs} {which:<8}: {elapsed * 1000:8.1f} ms", flush=True)
    pv, hand = median(times["parvisor"]), median(times["by hand"])
    diff_ms, ratio = (pv - hand) * 1000, pv / hand
    allowed_ms = max(TARGET_MS, (TARGET_RATIO - 1) * hand * 1000)
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f" on {os.cpu_count()} CPUs (other load inflates both sides)")
    print(f"start -> first userspace line, median of {runs}:")
    print(f"  parvisor (API vm start): {pv * 1000:8.1f} ms")
    print(f"  same QEMU argv by hand:  {hand * 1000:8.1f} ms")
    print(f"  difference: {diff_ms:+.1f} ms   ratio parvisor/by-hand: {ratio:.3f}")
    print(f"  target: parvisor adds <= 10 % or <= 150 ms (here <= {allowed_ms:.0f} ms): "
          + ("MET" if diff_ms <= allowed_ms else "MISSED"))


if __name__ == "__main__":
    main()
