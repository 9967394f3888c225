"""``parvisor vm replication enable|status|disable|failover NAME``: VM disk replication
between cluster hosts (issue 9). Thin wrappers over /v1/vms/NAME/replication: the
request is recorded in etcd by the API; the hosts carry it out (``status`` follows it).
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from parvisor.cli.main import JsonOpt, client, emit, out, vm_app
from parvisor.model.sizes import format_size

replication_app = typer.Typer(no_args_is_help=True,
                              help="Replicate a VM's disks to another host (or site).")
vm_app.add_typer(replication_app, name="replication")


@replication_app.command("enable")
def enable(name: str,
           mode: str = typer.Option(..., "--mode", help="sync (no acknowledged write lost) "
                                                        "or async (every --interval)."),
           interval: Optional[str] = typer.Option(
               None, "--interval", help="async: 30s, 5m or 15m (default 5m)."),
           to: Optional[str] = typer.Option(
               None, "--to", help="Replica host (default: chosen, in another site when "
                                  "sites are defined)."),
           stall_limit: Optional[float] = typer.Option(
               None, "--stall-limit", help="sync: longest guest write stall in seconds "
                                           "before the VM carries on alone (default 5)."),
           as_json: bool = JsonOpt) -> None:
    """Start replicating NAME's disks to a replica host (initial sync in the background)."""
    if mode not in ("sync", "async"):
        raise typer.BadParameter("--mode must be sync or async")
    body: dict[str, Any] = {"mode": mode}
    for key, value in (("interval", interval), ("to", to), ("stall_limit_s", stall_limit)):
        if value is not None:
            body[key] = value
    result = client().post(f"/vms/{name}/replication", body)

    def human(r: dict[str, Any]) -> None:
        every = f", every {r['interval_s']} s" if r["mode"] == "async" else ""
        out.print(f"{r['vm_name']}: {r['mode']} replication {r['primary']} -> "
                  f"{r['replica']}{every}: {r['state']} (see: parvisor vm replication "
                  f"status {r['vm_name']})", markup=False)
        _note(r)
    emit(result, as_json, human)


@replication_app.command("status")
def status(name: str, as_json: bool = JsonOpt) -> None:
    """Mode, hosts, state, bytes behind, last consistent point, RPO, failover cost."""
    emit(client().get(f"/vms/{name}/replication"), as_json, print_status)


@replication_app.command("disable")
def disable(name: str, as_json: bool = JsonOpt) -> None:
    """Stop replicating (also during the initial sync); the replica image is deleted."""
    result = client().request("DELETE", f"/vms/{name}/replication")
    emit(result, as_json, lambda r: (out.print(f"{r['vm_name']}: replication "
                                               f"{r['state']}", markup=False), _note(r)))


@replication_app.command("failover")
def failover(name: str,
             force: bool = typer.Option(False, "--force", help="Accept losing the writes "
                                        "after the last consistent point (broken replica)."),
             planned: bool = typer.Option(False, "--planned", help="Move to the replica "
                                          "with no data loss and reverse the direction."),
             test: bool = typer.Option(False, "--test", help="Boot a throwaway copy of the "
                                       "replica on an isolated switch."),
             test_stop: bool = typer.Option(False, "--test-stop", help="End a test "
                                            "failover (its copy is deleted)."),
             as_json: bool = JsonOpt) -> None:
    """Fail NAME over to its replica host (no flag: its primary is down)."""
    chosen = [flag for flag, on in (("--force", force), ("--planned", planned),
                                    ("--test", test), ("--test-stop", test_stop)) if on]
    if len(chosen) > 1:
        raise typer.BadParameter(f"choose one of {', '.join(chosen)}")
    result = client().post(f"/vms/{name}/replication/failover",
                           {"force": force, "planned": planned, "test": test,
                            "test_stop": test_stop})

    def human(r: dict[str, Any]) -> None:
        if "state" in r and "primary" in r:
            out.print(f"{r.get('vm_name', name)}: replication {r['state']}, primary "
                      f"{r['primary']}, replica {r['replica']}", markup=False)
        elif r.get("result"):
            out.print(f"{name}: {r['result']}", markup=False)
        _note(r)
    emit(result, as_json, human)


# --- output -----------------------------------------------------------------------------
def _note(r: dict[str, Any]) -> None:
    if r.get("note"):
        out.print(r["note"], markup=False)


def status_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The status table's rows (label, text), in reading order."""
    every = f", every {r['interval_s']} s" if r["mode"] == "async" else ""
    state = r["state"] + (f" ({r['progress_percent']}% copied)"
                          if r.get("progress_percent") is not None else "")
    if r.get("reason"):
        state += f": {r['reason']}"
    rows = [("mode", r["mode"] + every),
            ("primary", r["primary"] + ("" if r.get("primary_up", True) else " (down)")),
            ("replica", r["replica"] + ("" if r.get("replica_up", True) else " (down)")),
            ("generation", str(r["generation"])),
            ("state", state),
            ("bytes behind", format_size(r.get("bytes_behind") or 0)),
            ("last consistent", r["last_consistent_point"]),
            ("RPO", _rpo(r.get("rpo_s"))),
            ("failover", ("allowed: " if r.get("failover_allowed") else "refused: ")
             + r["failover"])]
    if r["mode"] == "sync":
        rows.append(("stall limit", f"{r['stall_limit_s']:g} s"))
    if r.get("protection"):
        rows.append(("protection", r["protection"]))
    if r.get("last_failover"):
        rows.append(("last failover", r["last_failover"]))
    for disk in r.get("disks") or []:
        rows.append((f"disk {disk['id']}", f"{disk.get('primary_path') or '?'} -> "
                     f"{disk.get('replica_path') or '(not created yet)'}"
                     + (f" via {disk['export']}" if disk.get("export") else "")))
    return rows


def _rpo(rpo_s: float | None) -> str:
    if rpo_s is None:
        return "unknown (no consistent copy)"
    if rpo_s == 0:
        return "0 (no acknowledged write lost)"
    return f"{rpo_s:.0f} s"


def print_status(r: dict[str, Any]) -> None:
    table = Table(title=f"replication of {r['vm_name']}", show_header=False,
                  title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for label, text in status_rows(r):
        table.add_row(label, Text(text))     # paths, reasons: never markup
    out.print(table)
