"""``parvisor`` command line: a thin client of the host service's API.

Every command but ``host serve`` asks the running service. ``--json`` prints the API's
objects unchanged (scripts rely on them). Errors: one readable line, exit status 1
(``vm exec`` exits with the guest command's status, or 125 when parvisor fails).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from parvisor.cli.client import ApiClient
from parvisor.errors import ParvisorError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="parvisor: run VMs on this host (Hyper-V's design on KVM/QEMU).")
host_app = typer.Typer(no_args_is_help=True, help="The host and its service.")
image_app = typer.Typer(no_args_is_help=True, help="Guest images.")
vm_app = typer.Typer(no_args_is_help=True, help="Virtual machines.")
app.add_typer(host_app, name="host")
app.add_typer(image_app, name="image")
app.add_typer(vm_app, name="vm")

out = Console()
err = Console(stderr=True)
STATE = {"state_dir": None}
JsonOpt = typer.Option(False, "--json", help="Print JSON (stable field names).")


class AutoStart(str, Enum):
    nothing = "nothing"
    start_if_running = "start-if-running"
    always_start = "always-start"


class AutoStop(str, Enum):
    save = "save"
    shutdown = "shutdown"
    turn_off = "turn-off"


@app.callback()
def main_options(state_dir: Optional[str] = typer.Option(
        None, "--state-dir", envvar="PARVISOR_STATE_DIR",
        help="Instance directory (store, sockets, logs, images); default /var/lib/parvisor.")
) -> None:
    STATE["state_dir"] = state_dir


def client() -> ApiClient:
    return ApiClient(STATE["state_dir"])


def emit(data: Any, as_json: bool, human: Any = None) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    elif human is not None:
        human(data) if callable(human) else out.print(human)


def run_job(api: ApiClient, job: dict[str, Any], as_json: bool) -> dict[str, Any]:
    if as_json or not sys.stderr.isatty():
        return api.wait_job(job)
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(job["kind"], total=1.0)

        def update(current: dict[str, Any]) -> None:
            progress.update(task, completed=current["progress"],
                            description=f"{current['kind']}: {current['message']}")
        return api.wait_job(job, update)


# --- host ------------------------------------------------------------------------------
@host_app.command("serve")
def host_serve() -> None:
    """Run the host service in the foreground (API on the unix socket, optionally TCP)."""
    from parvisor.service import serve_forever
    serve_forever(STATE["state_dir"])


@host_app.command("info")
def host_info(as_json: bool = JsonOpt) -> None:
    """Hypervisor, CPU, memory and QEMU of this host."""
    info = client().get("/host")

    def human(i: dict[str, Any]) -> None:
        out.print(f"name:          {i['name']}")
        out.print(f"accelerator:   {i['accelerator']} ({i['accelerator_reason']})")
        if i.get("accelerator_warning"):
            out.print(f"[yellow]warning: {i['accelerator_warning']}[/yellow]")
        out.print(f"cpu:           {i['cpu_model']}, {i['cores']} cores, {i['architecture']}")
        out.print(f"memory:        {i['memory_bytes'] >> 20} MiB total, "
                  f"{i['free_memory_for_vms_bytes'] >> 20} MiB free for VMs")
        out.print(f"qemu:          {i['qemu_version']}")
    emit(info, as_json, human)


@host_app.command("shutdown-vms")
def host_shutdown_vms(as_json: bool = JsonOpt) -> None:
    """Apply every running VM's automatic stop action (the host is going down)."""
    result = client().post("/host/shutdown-vms")
    emit(result, as_json, lambda r: [out.print(f"{k}: {v}") for k, v in r["results"].items()])


# --- image -----------------------------------------------------------------------------
@image_app.command("build-tiny")
def image_build_tiny(force: bool = typer.Option(False, "--force", help="Rebuild."),
                     as_json: bool = JsonOpt) -> None:
    """Build the tiny guest (Debian cloud kernel + busybox initramfs + guest agent)."""
    api = client()
    job = run_job(api, api.post("/images/tiny", {"force": force})["job"], as_json)
    emit(job["result"], as_json,
         lambda r: out.print(f"tiny image ready: kernel {r['kernel_release']} at {r['kernel']}"))


# --- events ----------------------------------------------------------------------------
@app.command("events")
def events(vm: Optional[str] = typer.Option(None, "--vm", help="Only this VM."),
           limit: int = typer.Option(50, "--limit", min=1, max=10000),
           as_json: bool = JsonOpt) -> None:
    """State changes and errors, oldest first."""
    params = {"limit": limit, **({"vm": vm} if vm else {})}
    items = client().get("/events", params=params)

    def human(rows: list[dict[str, Any]]) -> None:
        import datetime
        for e in rows:
            when = datetime.datetime.fromtimestamp(e["timestamp"]).strftime("%Y-%m-%d %H:%M:%S")
            out.print(f"{when}  {e['kind']:<10} {e['message']}", markup=False)
    emit(items, as_json, human)


def main() -> None:
    from parvisor.cli import vm_commands  # noqa: F401  (registers the vm commands)
    from parvisor.cli import disk_commands  # noqa: F401  (disk + vm cdrom commands)
    from parvisor.cli import switch_commands  # noqa: F401
    from parvisor.cli import hotplug_commands  # noqa: F401  (vm nic|disk add|remove)
    from parvisor.cli import import_commands, plan_command  # noqa: F401  (import, plan)
    from parvisor.cli import checkpoint_commands  # noqa: F401  (checkpoint, clone, export)
    from parvisor.cli import cluster_commands, lab_commands  # noqa: F401  (cluster, lab)
    from parvisor.cli import migration_commands  # noqa: F401  (vm migrate)
    from parvisor.cli import replication_commands  # noqa: F401  (vm replication)
    from parvisor.cli import user_commands  # noqa: F401  (web console users)
    try:
        app()
    except ParvisorError as exc:
        err.print(f"error: {exc.message}", markup=False, highlight=False)
        sys.exit(1)
