"""``parvisor plan``: consolidation planning, run locally (it needs no host state).

A thin adapter over ``parvisor.planner``: parse the inventory and host models, plan,
render as a table, JSON or a self-contained HTML report (to ``--output`` or stdout).
``--cluster`` (plan onto the live cluster) belongs to the failover-cluster issue and is
refused with a clear message until then.

What never: no service call, no file written except ``--output``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from parvisor.cli.main import app, out
from parvisor.errors import InvalidInput
from parvisor.planner import parse_host_model, parse_inventory, plan, render_html, render_text


class PlanFormat(str, Enum):
    table = "table"
    json = "json"
    html = "html"


class CpuBasis(str, Enum):
    peak = "peak"
    avg = "avg"


@app.command("plan")
def plan_command(
        inventory: Path = typer.Option(..., "--inventory", help="CSV: name,cores,ghz,"
                                       "cpu_avg_pct,cpu_peak_pct,ram_gb,ram_used_gb,"
                                       "disk_gb[,iops]"),
        host_model: list[str] = typer.Option(..., "--host-model", help="NAME:cores=N,"
                                             "ghz=F,ram_gb=N,disk_gb=N[,cost=F]; repeatable."),
        reserve: int = typer.Option(1, "--reserve", min=0, help="Failover hosts (N+k)."),
        headroom: float = typer.Option(20.0, "--headroom", help="Percent kept free."),
        cpu_basis: CpuBasis = typer.Option(CpuBasis.peak, "--cpu-basis"),
        fmt: PlanFormat = typer.Option(PlanFormat.table, "--format"),
        output: Optional[Path] = typer.Option(None, "--output", help="Write here."),
        cluster: bool = typer.Option(False, "--cluster", help="Plan onto the live "
                                     "cluster (needs the failover cluster).")) -> None:
    """How many hosts of which model the servers of an inventory need."""
    if cluster:
        raise InvalidInput("plan --cluster is not available yet: it needs the failover "
                           "cluster (issue: failover clustering); plan onto host models "
                           "with --host-model instead")
    result = plan(parse_inventory(inventory), [parse_host_model(m) for m in host_model],
                  reserve=reserve, headroom_pct=headroom, cpu_basis=cpu_basis.value)
    text = {PlanFormat.table: lambda: render_text(result),
            PlanFormat.json: lambda: result.to_json(indent=2) + "\n",
            PlanFormat.html: lambda: render_html(result)}[fmt]()
    if output is None:
        print(text, end="")
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"--output {output}: cannot write: {exc.strerror}",
                           path=str(output)) from exc
    out.print(f"plan written to {output} ({result.hosts_needed} x "
              f"{result.host_model.name})", markup=False, highlight=False)
