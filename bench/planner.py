#!/usr/bin/env python3
"""Planner: run time and plan size / lower bound for 100, 1,000 and 10,000 servers.

Generated estates (seeded RNG: 1-16 cores at 1.8-3.6 GHz, 5-95 % peak CPU, 2-64 GB RAM,
20-800 GB disk) planned on one host model (32 cores x 2.6 GHz, 384 GB, 8 TB), headroom
20 %, N+1. Prints, per size, the median run time of --runs (default 5) and the ratio of
active hosts to the lower bound (max over dimensions of ceil(total demand / usable
capacity)). Targets: ratio <= 1.25; 10,000 servers in a few seconds.

    .venv/bin/python bench/planner.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from parvisor.testing.estates import generated_estate
from parvisor.planner import HostModel, plan

MODEL = HostModel("std", 32, 2.6, 384, 8000)


estate = generated_estate   # shared with the tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{'servers':>8} {'median s':>9} {'hosts':>6} {'bound':>6} {'ratio':>6}")
    for count in (100, 1000, 10000):
        servers, times = estate(count, seed=count), []
        for _ in range(max(args.runs, 1)):
            started = time.perf_counter()
            result = plan(servers, [MODEL], headroom_pct=20, reserve=1)
            times.append(time.perf_counter() - started)
        ratio = result.active_hosts / result.lower_bound
        print(f"{count:>8} {statistics.median(times):>9.3f} {result.active_hosts:>6} "
              f"{result.lower_bound:>6} {ratio:>6.3f}")


if __name__ == "__main__":
    main()
