"""Consolidation planning: how many hosts of which model an estate of servers needs.

Pure: servers and host models in, a ``PlanResult`` out; no I/O, no clock, no randomness.

Demand per server (each choice documented because it changes the answer):

* CPU (GHz) = cores x ghz x cpu_peak_pct / 100 (``cpu_basis="peak"``, the default: a host
  sized on averages saturates exactly when the servers are busiest) or cpu_avg_pct.
* RAM (GB) = ``ram_gb``, the memory the server has (``ram_basis="allocated"``, default):
  a VM's memory is allocated whole by QEMU/KVM, no ballooning or dynamic memory is
  assumed. ``ram_basis="used"`` sizes on ``ram_used_gb`` for estates that will shrink
  their VMs.
* Disk (GB) = ``disk_gb``; IOPS only when the host model has ``iops``.

Usable capacity = model capacity x (1 - headroom/100). Packing: first-fit decreasing on
the dominant resource (each server sorted by its largest share of a host), with a
segment tree over hosts so the first fitting host is found in O(log hosts); then a local
improvement pass that tries to empty the least-loaded hosts into the others (best fit).
Every server must fit an empty host of the model (otherwise the model is not eligible).

N+k: ``reserve`` empty hosts are added (``hosts_needed = active_hosts + reserve``). With
identical hosts, k empty hosts absorb the load of any k failed hosts. ``lower_bound`` =
max over dimensions of ceil(total demand / usable capacity), for the active hosts.

Model choice: the cheapest total (hosts_needed x cost) when every model has a cost,
otherwise the fewest hosts; ties go to the model given first.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

from parvisor.errors import InvalidInput
from parvisor.planner.inventory import HostModel, Server

EPS = 1e-9
MAX_IMPROVE_ATTEMPTS = 64
CpuBasis = Literal["peak", "avg"]
RamBasis = Literal["allocated", "used"]


@dataclass(frozen=True)
class HostPlan:
    name: str
    servers: tuple[str, ...]
    used: dict[str, float]             # per dimension, in its unit (GHz, GB, IOPS)
    capacity: dict[str, float]         # the model's full capacity
    utilization_pct: dict[str, float]  # used / full capacity x 100


@dataclass(frozen=True)
class ModelOption:
    model: str
    eligible: bool
    hosts_needed: int = 0
    total_cost: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class PlanResult:
    host_model: HostModel
    hosts_needed: int                  # active + reserve
    active_hosts: int
    reserve: int
    lower_bound: int
    headroom_pct: float
    cpu_basis: str
    ram_basis: str
    total_cost: float | None
    dimensions: tuple[str, ...]
    hosts: tuple[HostPlan, ...]
    placements: dict[str, str]         # server name -> host name
    totals: dict[str, float]           # total demand per dimension
    options: tuple[ModelOption, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


# --- demand ------------------------------------------------------------------------------
def dimensions_for(model: HostModel, servers: Sequence[Server]) -> tuple[str, ...]:
    dims = ("cpu_ghz", "ram_gb", "disk_gb")
    if model.iops and all(s.iops is not None for s in servers):
        dims += ("iops",)
    return dims


def demand(server: Server, dims: Sequence[str], cpu_basis: CpuBasis,
           ram_basis: RamBasis) -> tuple[float, ...]:
    pct = server.cpu_peak_pct if cpu_basis == "peak" else server.cpu_avg_pct
    values = {"cpu_ghz": server.cores * server.ghz * pct / 100,
              "ram_gb": server.ram_gb if ram_basis == "allocated" else server.ram_used_gb,
              "disk_gb": server.disk_gb, "iops": server.iops or 0.0}
    return tuple(values[d] for d in dims)


def capacity(model: HostModel, dims: Sequence[str]) -> tuple[float, ...]:
    values = {"cpu_ghz": model.cpu_ghz, "ram_gb": model.ram_gb, "disk_gb": model.disk_gb,
              "iops": model.iops or 0.0}
    return tuple(values[d] for d in dims)


def lower_bound(demands: Sequence[Sequence[float]], usable: Sequence[float]) -> int:
    bound = 0
    for d, cap in enumerate(usable):
        total = sum(v[d] for v in demands)
        bound = max(bound, math.ceil(total / cap - EPS))
    return max(bound, 1)


# --- first fit decreasing with a segment tree ---------------------------------------------
class _FirstFitTree:
    """Leftmost host whose residual (normalised, 1.0 = empty) fits a demand vector.

    Each node keeps the per-dimension maximum residual of its subtree: a node whose
    maximum is below the demand in any dimension cannot hold a fitting host.
    """

    def __init__(self, leaves: int, dims: int) -> None:
        self.size = 1 << max(leaves - 1, 0).bit_length()
        self.dims = dims
        self.tree = [[1.0] * (2 * self.size) for _ in range(dims)]

    def find(self, need: Sequence[float]) -> int:
        """Exact first fit: depth-first, left first, pruning subtrees by their maxima."""
        tree, dims = self.tree, range(self.dims)
        stack = [1]
        while stack:
            node = stack.pop()
            if any(tree[d][node] < need[d] - EPS for d in dims):
                continue
            if node >= self.size:
                return node - self.size
            stack.append(2 * node + 1)
            stack.append(2 * node)
        return -1

    def take(self, leaf: int, need: Sequence[float]) -> None:
        node = leaf + self.size
        for d in range(self.dims):
            self.tree[d][node] -= need[d]
        node //= 2
        while node:
            for d in range(self.dims):
                col = self.tree[d]
                col[node] = max(col[2 * node], col[2 * node + 1])
            node //= 2


def first_fit_decreasing(needs: Sequence[Sequence[float]]) -> list[list[int]]:
    """Bins (lists of item indexes); ``needs`` normalised to the usable capacity (every
    item <= 1.0 in every dimension, so an unopened host always fits)."""
    order = sorted(range(len(needs)), key=lambda i: (-max(needs[i]), i))
    tree = _FirstFitTree(len(needs), len(needs[0]) if needs else 0)
    bins: list[list[int]] = []
    for item in order:
        leaf = tree.find(needs[item])
        while leaf >= len(bins):
            bins.append([])
        tree.take(leaf, needs[item])
        bins[leaf].append(item)
    return bins


# --- local improvement ---------------------------------------------------------------------
def _loads(bins: list[list[int]], needs: Sequence[Sequence[float]], dims: int
           ) -> list[list[float]]:
    return [[sum(needs[i][d] for i in b) for d in range(dims)] for b in bins]


def _try_empty(victim: int, bins: list[list[int]], loads: list[list[float]],
               needs: Sequence[Sequence[float]]) -> dict[int, int] | None:
    """Move every server of ``victim`` elsewhere (best fit), or None if one does not fit."""
    dims = range(len(loads[victim]))
    trial = {h: list(load) for h, load in enumerate(loads) if h != victim}
    moves: dict[int, int] = {}
    for item in sorted(bins[victim], key=lambda i: -max(needs[i])):
        best, best_slack = -1, 2.0
        for host, load in trial.items():
            if all(load[d] + needs[item][d] <= 1.0 + EPS for d in dims):
                slack = 1.0 - max(load[d] + needs[item][d] for d in dims)
                if slack < best_slack:
                    best, best_slack = host, slack
        if best < 0:
            return None
        for d in dims:
            trial[best][d] += needs[item][d]
        moves[item] = best
    return moves


def improve(bins: list[list[int]], needs: Sequence[Sequence[float]],
            max_attempts: int = MAX_IMPROVE_ATTEMPTS) -> list[list[int]]:
    """Empty the least-loaded hosts while their servers fit elsewhere."""
    bins = [list(b) for b in bins]
    dims = len(needs[0]) if needs else 0
    attempts, progress = 0, True
    while progress and attempts < max_attempts and len(bins) > 1:
        progress = False
        loads = _loads(bins, needs, dims)
        for victim in sorted(range(len(bins)), key=lambda h: sum(loads[h]))[:8]:
            attempts += 1
            moves = _try_empty(victim, bins, loads, needs)
            if moves is not None:
                for item, host in moves.items():
                    bins[host].append(item)
                del bins[victim]
                progress = True
                break
            if attempts >= max_attempts:
                break
    return bins


# --- one model, then the choice ---------------------------------------------------------
@dataclass(frozen=True)
class _Packed:
    model: HostModel
    dims: tuple[str, ...]
    bins: list[list[int]]
    demands: list[tuple[float, ...]]
    lower_bound: int


def _too_big(server: Server, need: Sequence[float], usable: Sequence[float],
             dims: Sequence[str]) -> str | None:
    for d, dim in enumerate(dims):
        if need[d] > usable[d] + EPS:
            return (f"server '{server.name}' needs {need[d]:g} {dim} but a host offers "
                    f"{usable[d]:g} after headroom")
    return None


def pack_for_model(servers: Sequence[Server], model: HostModel, *, headroom_pct: float,
                   cpu_basis: CpuBasis, ram_basis: RamBasis) -> _Packed | str:
    """The packing for one model, or the reason the model cannot hold the estate."""
    dims = dimensions_for(model, servers)
    usable = [c * (1 - headroom_pct / 100) for c in capacity(model, dims)]
    demands = [demand(s, dims, cpu_basis, ram_basis) for s in servers]
    for server, need in zip(servers, demands):
        reason = _too_big(server, need, usable, dims)
        if reason:
            return reason
    needs = [tuple(v / u for v, u in zip(need, usable)) for need in demands]
    bins = improve(first_fit_decreasing(needs), needs)
    return _Packed(model, dims, bins, demands, lower_bound(demands, usable))


def _choose(packed: list[_Packed], reserve: int) -> _Packed:
    with_cost = all(p.model.cost is not None for p in packed)
    if with_cost:
        return min(packed, key=lambda p: (len(p.bins) + reserve) * p.model.cost)  # type: ignore
    return min(packed, key=lambda p: len(p.bins))


def _validate_options(servers: Sequence[Server], models: Sequence[HostModel],
                      reserve: int, headroom_pct: float) -> None:
    if not servers:
        raise InvalidInput("plan: the inventory has no servers")
    if not models:
        raise InvalidInput("plan: give at least one host model")
    if reserve < 0:
        raise InvalidInput(f"plan: reserve {reserve} must be >= 0", field="reserve")
    if not 0 <= headroom_pct < 100:
        raise InvalidInput(f"plan: headroom {headroom_pct:g}% must be between 0 and 99",
                           field="headroom")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise InvalidInput(f"plan: host model names repeat: {names}", field="host_model")


def plan(servers: Sequence[Server], models: Sequence[HostModel], *, reserve: int = 1,
         headroom_pct: float = 20.0, cpu_basis: CpuBasis = "peak",
         ram_basis: RamBasis = "allocated") -> PlanResult:
    """Plan the estate on the best host model; InvalidInput when no model can hold it."""
    _validate_options(servers, models, reserve, headroom_pct)
    packed, options = [], []
    for model in models:
        result = pack_for_model(servers, model, headroom_pct=headroom_pct,
                                cpu_basis=cpu_basis, ram_basis=ram_basis)
        if isinstance(result, str):
            options.append(ModelOption(model.name, False, reason=result))
            continue
        packed.append(result)
        needed = len(result.bins) + reserve
        options.append(ModelOption(model.name, True, needed, needed * model.cost
                                   if model.cost is not None else None))
    if not packed:
        reasons = "; ".join(f"{o.model}: {o.reason}" for o in options)
        raise InvalidInput(f"plan: a server is bigger than every host model ({reasons})",
                           options=[asdict(o) for o in options])
    best = _choose(packed, reserve)
    return _result(best, servers, reserve, headroom_pct, cpu_basis, ram_basis,
                   tuple(options))


def _result(best: _Packed, servers: Sequence[Server], reserve: int, headroom_pct: float,
            cpu_basis: str, ram_basis: str, options: tuple[ModelOption, ...]) -> PlanResult:
    full = capacity(best.model, best.dims)
    width = max(3, len(str(len(best.bins) + reserve)))
    hosts, placements = [], {}
    for number, members in enumerate(best.bins + [[] for _ in range(reserve)], start=1):
        name = f"{best.model.name}-{number:0{width}d}"
        used = [sum(best.demands[i][d] for i in members) for d in range(len(best.dims))]
        hosts.append(HostPlan(
            name, tuple(servers[i].name for i in members),
            {dim: round(u, 4) for dim, u in zip(best.dims, used)},
            dict(zip(best.dims, full)),
            {dim: round(100 * u / c, 2) for dim, u, c in zip(best.dims, used, full)}))
        placements.update({servers[i].name: name for i in members})
    needed = len(best.bins) + reserve
    totals = {dim: round(sum(v[d] for v in best.demands), 4)
              for d, dim in enumerate(best.dims)}
    return PlanResult(best.model, needed, len(best.bins), reserve, best.lower_bound,
                      headroom_pct, cpu_basis, ram_basis,
                      needed * best.model.cost if best.model.cost is not None else None,
                      best.dims, tuple(hosts), placements, totals, options)
