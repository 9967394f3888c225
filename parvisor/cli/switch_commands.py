"""``parvisor switch …`` commands: thin wrappers over /v1/switches."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional

import typer
from rich.table import Table

from parvisor.cli.main import JsonOpt, app, client, emit, out

switch_app = typer.Typer(no_args_is_help=True, help="Virtual switches (networks for VMs).")
app.add_typer(switch_app, name="switch")


class SwitchType(str, Enum):
    external = "external"
    internal = "internal"
    private = "private"
    nat = "nat"


def _describe(status: dict[str, Any]) -> str:
    d = status["definition"]
    detail = {"external": f"uplink {d.get('uplink')}",
              "internal": f"host {d.get('host_address') or '-'}",
              "nat": f"subnet {d.get('subnet')}", "private": "VMs only"}[d["type"]]
    return detail


@switch_app.command("create")
def create(name: str,
           type_: SwitchType = typer.Option(..., "--type", help="external|internal|private|nat"),
           uplink: Optional[str] = typer.Option(None, "--uplink",
                                                help="external: host interface to bridge"),
           host_address: Optional[str] = typer.Option(None, "--host-address",
                                                      help="internal: host CIDR on it"),
           subnet: Optional[str] = typer.Option(None, "--subnet",
                                                help="nat: VM network (default: a free /24)"),
           notes: str = typer.Option("", "--notes"),
           as_json: bool = JsonOpt) -> None:
    """Create a virtual switch."""
    body = {"name": name, "type": type_.value, "uplink": uplink,
            "host_address": host_address, "subnet": subnet, "notes": notes}
    status = client().post("/switches", {k: v for k, v in body.items() if v not in (None, "")})
    emit(status, as_json, lambda s: out.print(
        f"switch {name} ({type_.value}) created: bridge {s['bridge']}, {_describe(s)}",
        markup=False))


@switch_app.command("list")
def list_(as_json: bool = JsonOpt) -> None:
    """All virtual switches."""
    items = client().get("/switches")

    def human(rows: list[dict[str, Any]]) -> None:
        table = Table("NAME", "TYPE", "BRIDGE", "DETAIL", "VLAN MODE", box=None)
        for s in rows:
            table.add_row(s["definition"]["name"], s["definition"]["type"], s["bridge"],
                          _describe(s), s["vlan_mode"])
        out.print(table)
    emit(items, as_json, human)


@switch_app.command("delete")
def delete(name: str, as_json: bool = JsonOpt) -> None:
    """Delete a switch (refused while a VM's NIC uses it)."""
    emit(client().request("DELETE", f"/switches/{name}"), as_json,
         lambda r: out.print(f"switch {name} deleted", markup=False))
