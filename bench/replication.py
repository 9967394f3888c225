"""Replication engine figures: guest write cost on a disk replicated synchronously and on
one replicated asynchronously (cycles running) vs an unreplicated disk, in the same guest
and run, and the initial sync / incremental resync time of a 1 GiB disk.

One tiny TCG guest (192 MiB, 1 vCPU) with three qcow2 data disks on this host:
``vdb`` (64 MiB) replicated synchronously to a ``qemu-storage-daemon`` on 127.0.0.1,
``vdc`` (64 MiB) not replicated, ``vdd`` (1 GiB, filled with non-zero data before boot).

(a) Write latency: one guest ``dd`` of ``--writes`` 4 KiB blocks with
    ``oflag=direct`` (each write waits for completion) to the replicated and to the plain
    disk, alternating which goes first each run; wall time per write (the guest exec's
    own overhead, identical on both, is spread over the writes). Median of ``--runs``
    runs and the ratio replicated/plain.
(b) Throughput: 32 MiB ``dd bs=1M oflag=direct conv=fsync`` on each disk; MiB/s,
    medians, ratio.
(c) Asynchronous mode: ``vdb`` (sync replication stopped, bitmaps gone) is replicated
    asynchronously into a fresh replica image: a background task runs cycles the way
    the coordinator does (``begin_cycle`` on the target, ``run_async_cycle``,
    ``commit_cycle``, ``confirm_async_cycle``), one every ``--async-interval`` seconds
    (default 2 s, far below the product's 30 s minimum, so measured writes overlap
    running cycles: the worst case). The same latency and throughput runs as (a)/(b),
    replicated vs plain, medians and ratios; printed too: the cycles run, MiB shipped
    and the share of the measurement with a cycle under way (``--async-interval 0``:
    back to back, every write during a cycle).
(d) Initial sync of ``vdd`` (1 GiB of data) into an empty replica: ``start_sync`` until
    in sync. Then the replica is frozen (SIGSTOP) until the replication breaks, the
    guest writes 16 MiB, and ``resync`` runs until in sync again (incremental).

The engine is measured directly (no cluster, one host, loopback): the CLI's
``vm replication enable`` drives the same engine calls through the coordinator, whose
etcd record round trips per async cycle are not in these figures.

Usage: .venv/bin/python bench/replication.py [--runs 9] [--writes 500] [--skip-1g]
       [--skip-async] [--async-interval 2]
Every QEMU and daemon started here is stopped by PID; temp dirs are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parvisor.migration.engine import free_port  # noqa: E402
from parvisor.replication.engine import (confirm_async_cycle, run_async_cycle,  # noqa: E402
                                         start_sync, stop_async)
from parvisor.replication.target import (ReplicaTarget, TargetSpec,  # noqa: E402
                                         create_replica_image)
from parvisor.storage.qemu_img import create_image  # noqa: E402
from parvisor.testing.guest_fixtures import short_state_dir, tiny_image_for_tests  # noqa: E402
from parvisor.testing.migration_fixtures import QemuSet, sh, tiny_definition  # noqa: E402

HOST = "127.0.0.1"
SMALL = 64 << 20
BIG = 1 << 30


async def timed(agent, script: str) -> float:
    started = time.monotonic()
    await sh(agent, script, timeout=600)
    return time.monotonic() - started


def latency_script(device: str, writes: int) -> str:
    """One dd writing ``writes`` 4 KiB blocks with O_DIRECT: each write waits for its
    completion (busybox dd has no dsync; one fsync at the end), so no process start-up
    is in the figure and every write is one round trip to the replica."""
    return (f"dd if=/dev/zero of={device} bs=4096 count={writes} oflag=direct conv=fsync"
            f" 2>/dev/null")


THROUGHPUT = "dd if=/dev/urandom of=/tmp/blob bs=1M count=32 2>/dev/null; true"


async def start_target(work: Path, image: Path, name: str) -> ReplicaTarget:
    return await ReplicaTarget.start(TargetSpec(
        image=image, format="qcow2", listen_host=HOST, port=free_port(HOST),
        state_dir=work / name))


async def measure(agent, replicated: str, plain: str, args: argparse.Namespace
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(a) and (b): per-write seconds and MiB/s on each disk, alternating the order."""
    lat: dict[str, list[float]] = {"replicated": [], "plain": []}
    thr: dict[str, list[float]] = {"replicated": [], "plain": []}
    for run in range(args.runs):
        order = [("replicated", replicated), ("plain", plain)]
        if run % 2:
            order.reverse()
        for name, dev in order:
            lat[name].append(await timed(agent, latency_script(dev, args.writes))
                             / args.writes)
            seconds = await timed(agent, f"dd if=/tmp/blob of={dev} bs=1M"
                                         f" oflag=direct conv=fsync 2>/dev/null")
            thr[name].append(32 / seconds)
    return lat, thr


def report(mode: str, lat: dict[str, list[float]], thr: dict[str, list[float]],
           args: argparse.Namespace) -> None:
    med = {k: statistics.median(v) for k, v in lat.items()}
    tmed = {k: statistics.median(v) for k, v in thr.items()}
    print(f"[{mode}] per-write seconds:",
          {k: [round(x, 4) for x in v] for k, v in lat.items()})
    print(f"[{mode}] MiB/s:", {k: [round(x, 1) for x in v] for k, v in thr.items()})
    print(f"[{mode}] O_DIRECT write 4 KiB (per write, median of {args.runs} runs of"
          f" {args.writes}): replicated {med['replicated'] * 1000:.2f} ms, plain"
          f" {med['plain'] * 1000:.2f} ms, ratio {med['replicated'] / med['plain']:.2f}")
    print(f"[{mode}] dd 32 MiB direct (median): replicated {tmed['replicated']:.1f} MiB/s,"
          f" plain {tmed['plain']:.1f} MiB/s, ratio"
          f" {tmed['replicated'] / tmed['plain']:.2f}", flush=True)


class AsyncCycles:
    """Runs async cycles in the background as the coordinator does, without etcd:
    begin on the replica, ship, commit on the replica, confirm on the primary; a failed
    cycle is aborted on the replica (its changes stay for the next one)."""

    def __init__(self, vm, node: str, target: ReplicaTarget, spool: Path,
                 interval_s: float) -> None:
        self.vm, self.node, self.target = vm, node, target
        self.spool, self.interval_s = spool, interval_s
        self.done, self.shipped, self.durations, self.busy_s = 0, 0, [], 0.0
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def cycle(self) -> None:
        began = time.monotonic()
        uri = await self.target.begin_cycle()
        try:
            result = await run_async_cycle(self.vm, self.node, uri, spool_dir=self.spool)
            await self.target.commit_cycle()
        except BaseException:
            await self.target.abort_cycle()
            raise
        await confirm_async_cycle(self.vm, self.node)
        self.done += 1
        self.shipped += result.bytes_shipped
        self.durations.append(result.duration_s)
        self.busy_s += time.monotonic() - began

    async def start(self) -> None:
        """The first (full) cycle runs before the measurement, then the loop."""
        self.spool.mkdir(exist_ok=True)
        await self.cycle()
        self.done, self.shipped, self.durations, self.busy_s = 0, 0, [], 0.0
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            await self.cycle()
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Let the cycle under way finish (a cancelled one would be aborted anyway)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        await stop_async(self.vm, self.node)


async def main(args: argparse.Namespace) -> None:
    image = tiny_image_for_tests()
    qemus = QemuSet()
    work = short_state_dir("pvrb-")
    qemus.dirs.append(work)
    targets: list[ReplicaTarget] = []
    try:
        paths = {d: work / f"{d}.qcow2" for d in ("vdb", "vdc", "vdd")}
        create_image(paths["vdb"], "qcow2", SMALL)
        create_image(paths["vdc"], "qcow2", SMALL)
        create_image(paths["vdd"], "qcow2", BIG)
        if not args.skip_1g:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {BIG}",
                            str(paths["vdd"])], check=True, capture_output=True)
        disks = tuple({"id": d, "path": str(p), "format": "qcow2"} for d, p in paths.items())
        vm, agent = await qemus.boot(tiny_definition(image, disks=disks))
        # the guest names them in order: /dev/vda (vdb), /dev/vdb (vdc), /dev/vdc (vdd)
        replicated, plain = "/dev/vda", "/dev/vdb"
        create_replica_image(work / "r-vdb.qcow2", "qcow2", SMALL)
        target = await start_target(work, work / "r-vdb.qcow2", "qsd-vdb")
        targets.append(target)
        rep = await start_sync(vm, "fmt-vdb", await target.export_live())
        await rep.wait_in_sync(600)
        await sh(agent, THROUGHPUT)

        lat, thr = await measure(agent, replicated, plain, args)
        report("sync", lat, thr, args)
        await rep.stop()

        if not args.skip_async:
            create_replica_image(work / "r-vdb-async.qcow2", "qcow2", SMALL)
            target = await start_target(work, work / "r-vdb-async.qcow2", "qsd-vdb-async")
            targets.append(target)
            cycles = AsyncCycles(vm, "fmt-vdb", target, work / "spool", args.async_interval)
            await cycles.start()
            began = time.monotonic()
            try:
                lat, thr = await measure(agent, replicated, plain, args)
            finally:
                await cycles.stop()
            measured = time.monotonic() - began
            report("async", lat, thr, args)
            print(f"async cycles while measuring ({measured:.1f} s): {cycles.done} committed,"
                  f" {cycles.shipped >> 20} MiB shipped, ship time median "
                  f"{statistics.median(cycles.durations or [0]):.2f} s, a cycle under way"
                  f" {100 * cycles.busy_s / measured:.0f}% of the time")

        if not args.skip_1g:
            create_replica_image(work / "r-vdd.qcow2", "qcow2", BIG)
            big = await start_target(work, work / "r-vdd.qcow2", "qsd-vdd")
            targets.append(big)
            uri = await big.export_live()
            started = time.monotonic()
            rep = await start_sync(vm, "fmt-vdd", uri, stall_limit_s=3.0)
            await rep.wait_in_sync(3600)
            initial = time.monotonic() - started
            big.freeze()
            await sh(agent, "dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync"
                            " 2>/dev/null")
            big.thaw()
            await sh(agent, "dd if=/tmp/blob of=/dev/vdc bs=1M count=16 seek=100"
                            " oflag=direct conv=fsync 2>/dev/null")
            started = time.monotonic()
            kind = await rep.resync(uri)
            await rep.wait_in_sync(3600)
            resync = time.monotonic() - started
            print(f"1 GiB disk: initial sync {initial:.1f} s ({1024 / initial:.0f} MiB/s);"
                  f" {kind} resync after 16 MiB written {resync:.2f} s, guest paused"
                  f" {rep.last_resync_pause_s * 1000:.0f} ms, {rep.resync_shipped >> 20}"
                  f" MiB shipped")
            await rep.stop()
    finally:
        for target in targets:
            target.thaw()
            await target.stop()
        await qemus.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--skip-1g", action="store_true")
    parser.add_argument("--skip-async", action="store_true")
    parser.add_argument("--async-interval", type=float, default=2.0,
                        help="seconds between async cycles (the product's minimum: 30)")
    asyncio.run(main(parser.parse_args()))
