"""Consolidation planning: how many physical hosts a virtualized estate needs.

``inventory`` parses the CSV and host-model specs, ``pack`` plans (pure), ``render``
draws the result (Rich table, self-contained HTML with an SVG chart; JSON via
``PlanResult.to_json``). The CLI ``parvisor plan`` is a thin adapter over these::

    servers = parse_inventory(path)
    models = [parse_host_model(spec) for spec in specs]
    result = plan(servers, models, reserve=1, headroom_pct=20, cpu_basis="peak",
                  ram_basis="allocated")
    render_text(result) | render_html(result) | result.to_json()
"""

from parvisor.planner.inventory import (
    HostModel, Server, parse_host_model, parse_inventory, parse_inventory_text)
from parvisor.planner.pack import HostPlan, ModelOption, PlanResult, plan
from parvisor.planner.render import render_html, render_table, render_text

__all__ = ["HostModel", "HostPlan", "ModelOption", "PlanResult", "Server",
           "parse_host_model", "parse_inventory", "parse_inventory_text", "plan",
           "render_html", "render_table", "render_text"]
