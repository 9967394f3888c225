"""``parvisor vm migrate NAME --to HOST`` (live migration between cluster hosts) and
``vm migrate --cancel NAME``. The request is recorded through the API of any cluster
host; the VM's owner host carries it out; this command follows the record's phase and
progress until it ends (``--no-wait`` returns at once)."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from parvisor.cli.main import JsonOpt, client, emit, err, out, vm_app
from parvisor.errors import ServiceUnavailable
from parvisor.model.sizes import format_size

POLL_S = 0.3
SERVICE_GONE_S = 60.0
TERMINAL = {"completed", "failed", "cancelled"}


@vm_app.command("migrate")
def migrate(name: str,
            to: Optional[str] = typer.Option(None, "--to", help="Destination host."),
            with_storage: bool = typer.Option(
                False, "--with-storage", help="Shared-nothing: mirror the disks too."),
            max_downtime: Optional[int] = typer.Option(
                None, "--max-downtime", help="Initial downtime limit in ms (default 100)."),
            bandwidth: Optional[str] = typer.Option(
                None, "--bandwidth", help="Cap per second, e.g. 500M (default unlimited)."),
            quick: bool = typer.Option(
                False, "--quick", help="Quick migration: save, move, restore (the guest "
                                       "pauses for the whole move; shared storage)."),
            cancel: bool = typer.Option(False, "--cancel", help="Cancel a running migration."),
            wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow it to the end."),
            as_json: bool = JsonOpt) -> None:
    """Move a running VM to another cluster host while its guest keeps running."""
    api = client()
    if cancel:
        emit(api.post(f"/vms/{name}/migration/cancel"), as_json,
             lambda r: out.print(f"cancel requested ({r['phase']})", markup=False))
        return
    if not to:
        raise typer.BadParameter("--to HOST is required (or --cancel)")
    body: dict[str, Any] = {"to": to, "with_storage": with_storage, "quick": quick}
    if max_downtime is not None:
        body["max_downtime_ms"] = max_downtime
    if bandwidth is not None:
        body["bandwidth"] = bandwidth
    record = api.post(f"/vms/{name}/migrate", body)
    if wait:
        record = _follow(api, name, as_json)
    emit(_result(record) if as_json else record, as_json, _print_result)
    if record["phase"] in ("failed", "cancelled"):
        raise typer.Exit(1)


def _follow(api: Any, name: str, quiet: bool) -> dict[str, Any]:
    if quiet or not sys.stderr.isatty():
        return _poll(api, name, None)
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("requested", total=1.0)

        def update(record: dict[str, Any]) -> None:
            fraction, text = describe_progress(record)
            bar.update(task, completed=fraction, description=text)
        return _poll(api, name, update)


def _poll(api: Any, name: str, update: Any) -> dict[str, Any]:
    unreachable_since: float | None = None
    while True:
        try:
            record = api.get(f"/vms/{name}/migration")
            unreachable_since = None
        except ServiceUnavailable:
            # this host's service restarting: the migration goes on (its record is in
            # etcd), keep following it for a while
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > SERVICE_GONE_S:
                raise
            time.sleep(1.0)
            continue
        if update is not None:
            update(record)
        if record["phase"] in TERMINAL:
            return record
        time.sleep(POLL_S)


def describe_progress(record: dict[str, Any]) -> tuple[float, str]:
    """(fraction done, one line) from a migration record, for the bar."""
    p = record.get("progress") or {}
    phase = record["phase"]
    if phase != "performing" or not p:
        return (1.0 if phase in TERMINAL or phase in ("switched", "finished") else 0.0), phase
    total = (p.get("ram_total") or 0) + (p.get("disk_total") or 0)
    left = (p.get("ram_remaining") or 0) + (p.get("disk_remaining") or 0)
    fraction = 0.0 if not total else max(0.0, min(1.0, 1 - left / total))
    parts = [f"pass {p.get('passes', p.get('pass', '?'))}",
             f"RAM left {format_size(p.get('ram_remaining') or 0)}"]
    if p.get("disk_total"):
        parts.append(f"disk left {format_size(p.get('disk_remaining') or 0)}")
    if p.get("dirty_rate"):
        parts.append(f"dirty {format_size(int(p['dirty_rate']))}/s")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {p['eta_s']:.0f} s")
    return fraction, ", ".join(parts)


def _result(record: dict[str, Any]) -> dict[str, Any]:
    result = dict(record.get("result") or {})
    result.setdefault("source", record["source"])
    result.setdefault("destination", record["destination"])
    return {"vm": record["vm_name"], "phase": record["phase"], "reason": record["reason"],
            "total_time_ms": result.get("total_time_ms"),
            "downtime_ms": result.get("downtime_ms"),
            "transferred_bytes": result.get("transferred_bytes"),
            "source": result["source"], "destination": result["destination"],
            "with_storage": record["options"]["with_storage"],
            "encrypted": bool(record.get("tls")),
            "live": record["options"].get("live", True)}


def _print_result(record: dict[str, Any]) -> None:
    r = _result(record)
    if record["phase"] == "completed":
        out.print(f"{r['vm']} migrated {r['source']} -> {r['destination']} in "
                  f"{r['total_time_ms']} ms (downtime {r['downtime_ms']} ms, "
                  f"{format_size(r['transferred_bytes'] or 0)} sent)", markup=False)
    elif record["phase"] in TERMINAL:
        out.print(f"{r['vm']}: migration {record['phase']}: {record['reason']}; the VM "
                  f"stays on {r['source']}", markup=False)
    else:
        out.print(f"{r['vm']}: migration {record['phase']} ({r['source']} -> "
                  f"{r['destination']})", markup=False)
