"""Generated server inventories for the planner's tests and benchmark (seeded, so the
same ``n`` and ``seed`` always give the same estate)."""

from __future__ import annotations

import random

from parvisor.planner import Server


def generated_estate(n: int, seed: int) -> list[Server]:
    rng = random.Random(seed)
    servers = []
    for i in range(n):
        cores, ram = rng.choice([1, 2, 2, 4, 4, 8, 16]), rng.choice([2, 4, 8, 16, 32, 64])
        peak = rng.uniform(5, 95)
        servers.append(Server(f"srv{i:05d}", cores, rng.uniform(1.8, 3.6),
                              rng.uniform(1, peak), peak, ram, ram * rng.uniform(0.3, 1),
                              rng.uniform(20, 800)))
    return servers
