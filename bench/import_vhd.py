#!/usr/bin/env python3
"""VHD -> qcow2 through the importer versus ``qemu-img convert`` alone, on the same file.

The source is a dynamic VHD (qemu-img ``-O vpc``) of --size MiB (default 2048) whose
first half holds incompressible data, so both sides really copy data. Each round
converts it twice into fresh qcow2 files, alternating which side goes first:

- **importer:** ``validate_source`` (our footer / dynamic header / BAT checks and the
  chain resolution) + ``convert_to_qcow2`` (``qemu-img convert -p`` with
  ``--image-opts driver=vpc,force_size_calc=...``, progress parsing, the memory cap and
  the ``qemu-img info`` size check afterwards) — what an ``import vmc`` job runs per disk;
- **baseline:** ``qemu-img convert -f vpc -O qcow2 SRC DST``.

Prints the medians of --runs (default 15, after one warm-up of each) and their ratio;
target <= 1.05. Files live in a temp dir under /var/tmp that is removed at the end.

    .venv/bin/python bench/import_vhd.py [--runs 15] [--size 2048]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from parvisor.importers.convert import convert_to_qcow2, validate_source

MiB = 1 << 20


def make_vhd(folder: Path, size_mib: int) -> Path:
    raw = folder / "source.raw"
    with open(raw, "wb") as fh:
        for _ in range(size_mib // 2):
            fh.write(os.urandom(MiB))
        fh.truncate(size_mib * MiB)
    vhd = folder / "source.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", str(raw), str(vhd)],
                   check=True)
    raw.unlink()
    return vhd


def importer(vhd: Path, target: Path) -> float:
    start = time.perf_counter()
    source = validate_source(vhd, "vpc", [vhd.parent])
    convert_to_qcow2(source, target, target.parent, lambda _fraction: None)
    return time.perf_counter() - start


def baseline(vhd: Path, target: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "qcow2", str(vhd),
                    str(target)], check=True)
    return time.perf_counter() - start


def one_round(vhd: Path, folder: Path, index: int) -> tuple[float, float]:
    order = [("importer", importer), ("baseline", baseline)]
    if index % 2:
        order.reverse()
    times = {}
    for label, run in order:
        target = folder / f"{label}-{index}.qcow2"
        times[label] = run(vhd, target)
        target.unlink()
    return times["importer"], times["baseline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--size", type=int, default=2048, help="virtual size in MiB")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pv-bench-import-", dir="/var/tmp"))
    try:
        vhd = make_vhd(folder, args.size)
        one_round(vhd, folder, 0)                                  # warm-up (page cache)
        rounds = [one_round(vhd, folder, i) for i in range(1, args.runs + 1)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    imp = statistics.median(r[0] for r in rounds)
    base = statistics.median(r[1] for r in rounds)
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"VHD {args.size} MiB (half data), median of {args.runs}:")
    print(f"  importer  {imp * 1000:8.1f} ms")
    print(f"  qemu-img  {base * 1000:8.1f} ms")
    print(f"  ratio     {imp / base:8.3f}  (target <= 1.05: "
          f"{'met' if imp / base <= 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
