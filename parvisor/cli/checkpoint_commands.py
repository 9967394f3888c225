"""``parvisor vm checkpoint create|list|apply|delete``, ``vm clone``, ``vm export`` and
``vm import``: thin wrappers over the /v1 routes in ``parvisor.api.checkpoint_routes``.

(``parvisor import vmc|disk|ovf`` is a different command group: foreign formats in;
``vm import`` reads parvisor's own export directories.)
"""

from __future__ import annotations

import datetime
from typing import Any, Optional

import typer

from parvisor.cli.main import JsonOpt, client, emit, out, run_job, vm_app

checkpoint_app = typer.Typer(no_args_is_help=True, help="Checkpoints (snapshots) of a VM.")
vm_app.add_typer(checkpoint_app, name="checkpoint")


def _job(path: str, body: dict[str, Any] | None, as_json: bool,
         method: str = "POST") -> dict[str, Any]:
    api = client()
    started = api.request(method, path, json=body) if method != "POST" else api.post(path, body)
    return run_job(api, started["job"], as_json)["result"]


@checkpoint_app.command("create")
def checkpoint_create(name: str, checkpoint: Optional[str] = typer.Argument(None),
                      with_memory: bool = typer.Option(
                          False, "--with-memory", help="Also save the running memory."),
                      as_json: bool = JsonOpt) -> None:
    """Take a checkpoint of every writable disk (running or stopped VM)."""
    body = {"with_memory": with_memory, **({"name": checkpoint} if checkpoint else {})}
    result = _job(f"/vms/{name}/checkpoints", body, as_json)
    emit(result, as_json, lambda r: out.print(f"{name}: checkpoint '{r['name']}' created",
                                              markup=False))


def _print_tree(data: dict[str, Any]) -> None:
    items = {c["id"]: c for c in data["checkpoints"]}

    def show(item: dict[str, Any], depth: int) -> None:
        when = datetime.datetime.fromtimestamp(item["created"]).strftime("%Y-%m-%d %H:%M:%S")
        flags = [f for f, on in (("memory", item["with_memory"]),
                                 (item["phase"], item["phase"] != "ready")) if on]
        marker = "  <- current" if item["current"] else ""
        out.print(f"{'  ' * depth}{item['name']}  {when}"
                  f"{'  (' + ', '.join(flags) + ')' if flags else ''}{marker}",
                  markup=False, highlight=False)
        for child in item["children"]:
            show(items[child], depth + 1)
    roots = [c for c in data["checkpoints"] if c["parent"] not in items]
    if not roots:
        out.print(f"{data['vm']}: no checkpoints", markup=False)
    for root in roots:
        show(root, 0)


@checkpoint_app.command("list")
def checkpoint_list(name: str, as_json: bool = JsonOpt) -> None:
    """The VM's checkpoints as a tree; the current one is marked."""
    emit(client().get(f"/vms/{name}/checkpoints"), as_json, _print_tree)


@checkpoint_app.command("apply")
def checkpoint_apply(name: str, checkpoint: str, as_json: bool = JsonOpt) -> None:
    """Return the VM to CHECKPOINT (with memory: running again; else: off)."""
    result = _job(f"/vms/{name}/checkpoints/{checkpoint}/apply", None, as_json)
    emit(result, as_json, lambda r: out.print(f"{name}: checkpoint '{checkpoint}' applied "
                                              f"({r['state']})", markup=False))


@checkpoint_app.command("delete")
def checkpoint_delete(name: str, checkpoint: str, as_json: bool = JsonOpt) -> None:
    """Delete CHECKPOINT; every other checkpoint keeps its data."""
    result = _job(f"/vms/{name}/checkpoints/{checkpoint}", None, as_json, method="DELETE")
    emit(result, as_json, lambda r: out.print(f"{name}: checkpoint '{checkpoint}' deleted",
                                              markup=False))


@vm_app.command("clone")
def vm_clone(name: str, new_name: str,
             linked: bool = typer.Option(False, "--linked", help="Differencing disks over "
                                         "NAME's; NAME becomes a template."),
             as_json: bool = JsonOpt) -> None:
    """Copy a stopped VM under a new name (new uuid and MACs)."""
    result = _job(f"/vms/{name}/clone", {"new_name": new_name, "linked": linked}, as_json)
    emit(result, as_json, lambda r: out.print(f"{r['name']}: cloned from {name}",
                                              markup=False))


@vm_app.command("export")
def vm_export(name: str, directory: str, as_json: bool = JsonOpt) -> None:
    """Write a stopped VM into DIRECTORY (new or empty): definition + flattened disks."""
    result = _job(f"/vms/{name}/export", {"directory": directory}, as_json)
    emit(result, as_json, lambda r: out.print(f"{name}: exported to {r['directory']}",
                                              markup=False))


@vm_app.command("import")
def vm_import(directory: str, name: Optional[str] = typer.Option(None, "--name"),
              copy: bool = typer.Option(False, "--copy", help="Copy the files; new uuid and "
                                        "MACs (default)."),
              in_place: bool = typer.Option(False, "--in-place", help="Use the files where "
                                            "they are (inside the storage roots)."),
              as_json: bool = JsonOpt) -> None:
    """Register a VM from a directory written by 'vm export'."""
    if copy and in_place:
        raise typer.BadParameter("give --copy or --in-place, not both")
    body = {"directory": directory, "mode": "in-place" if in_place else "copy",
            **({"name": name} if name else {})}
    result = _job("/vm-imports", body, as_json)
    emit(result, as_json, lambda r: out.print(f"{r['name']}: imported", markup=False))
