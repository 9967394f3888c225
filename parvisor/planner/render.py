"""Renderers for a ``PlanResult``: a Rich table and a self-contained HTML report.

What never: no planning, no I/O (callers print or write the strings); the HTML has no
script and no external resource — the utilization chart is inline SVG — and every name
from the inventory is HTML-escaped.
"""

from __future__ import annotations

import html
import io

from rich.console import Console
from rich.table import Table

from parvisor.planner.pack import PlanResult

_UNITS = {"cpu_ghz": "CPU GHz", "ram_gb": "RAM GB", "disk_gb": "Disk GB", "iops": "IOPS"}
_COLORS = {"cpu_ghz": "#4e79a7", "ram_gb": "#f28e2b", "disk_gb": "#59a14f",
           "iops": "#b07aa1"}


def summary_lines(result: PlanResult) -> list[str]:
    model = result.host_model
    cost = f", total cost {result.total_cost:g}" if result.total_cost is not None else ""
    return [
        f"{result.hosts_needed} x {model.name} ({result.active_hosts} active + "
        f"{result.reserve} reserve for N+{result.reserve}){cost}",
        f"lower bound {result.lower_bound} active hosts "
        f"(plan / bound = {result.active_hosts / result.lower_bound:.2f})",
        f"CPU sized on {result.cpu_basis}, RAM on {result.ram_basis}, "
        f"headroom {result.headroom_pct:g}%",
    ]


def render_table(result: PlanResult) -> Table:
    table = Table(title=" | ".join(summary_lines(result)[:1]), caption="\n".join(
        summary_lines(result)[1:]))
    table.add_column("host")
    table.add_column("servers", justify="right")
    for dim in result.dimensions:
        table.add_column(f"{_UNITS[dim]} %", justify="right")
    for host in result.hosts:
        table.add_row(host.name, str(len(host.servers)),
                      *(f"{host.utilization_pct[d]:.1f}" for d in result.dimensions))
    return table


def render_text(result: PlanResult, width: int = 100) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render_table(result))
    return out.getvalue()


def utilization_svg(result: PlanResult) -> str:
    """One row per host, one bar per dimension; a dashed line marks the headroom limit."""
    dims, row_h, bar_h, label_w, plot_w = result.dimensions, 8 + 6 * len(
        result.dimensions), 5, 140, 500
    height = 30 + row_h * len(result.hosts)
    limit_x = label_w + plot_w * (100 - result.headroom_pct) / 100
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 20}" '
             f'height="{height}" role="img" aria-label="host utilization">']
    for i, dim in enumerate(dims):
        parts.append(f'<rect x="{label_w + i * 110}" y="4" width="10" height="10" '
                     f'fill="{_COLORS[dim]}"/><text x="{label_w + 14 + i * 110}" y="13" '
                     f'font-size="11">{_UNITS[dim]}</text>')
    for row, host in enumerate(result.hosts):
        y = 24 + row * row_h
        parts.append(f'<text x="0" y="{y + row_h / 2 + 3}" font-size="10">'
                     f'{html.escape(host.name)}</text>')
        for i, dim in enumerate(dims):
            width = plot_w * min(host.utilization_pct[dim], 100) / 100
            parts.append(f'<rect x="{label_w}" y="{y + i * 6}" width="{width:.1f}" '
                         f'height="{bar_h}" fill="{_COLORS[dim]}"><title>'
                         f'{html.escape(host.name)} {_UNITS[dim]} '
                         f'{host.utilization_pct[dim]:.1f}%</title></rect>')
    parts.append(f'<line x1="{limit_x:.1f}" y1="20" x2="{limit_x:.1f}" y2="{height}" '
                 'stroke="#c00" stroke-dasharray="4 3"/></svg>')
    return "".join(parts)


def render_html(result: PlanResult) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(h.name)}</td><td>{len(h.servers)}</td>"
        + "".join(f"<td>{h.utilization_pct[d]:.1f}</td>" for d in result.dimensions)
        + f"<td>{html.escape(', '.join(h.servers))}</td></tr>" for h in result.hosts)
    heads = "".join(f"<th>{_UNITS[d]} %</th>" for d in result.dimensions)
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(result))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>parvisor "
            "consolidation plan</title><style>body{font-family:sans-serif;margin:2em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
            "font-size:12px;text-align:left}</style></head><body>"
            f"<h1>Consolidation plan</h1><ul>{summary}</ul><h2>Host utilization</h2>"
            f"{utilization_svg(result)}<h2>Placements</h2><table><tr><th>host</th>"
            f"<th>servers</th>{heads}<th>placed servers</th></tr>{rows}</table>"
            "</body></html>")
