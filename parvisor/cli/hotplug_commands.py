"""``parvisor vm nic add|remove`` and ``vm disk add|remove`` (thin wrappers over
/v1/vms/NAME/nics|disks), plus the hot-add parts of ``vm set`` and ``vm show``
(resource controls, dynamic memory, memory hot-plug kind) used by vm_commands."""

from __future__ import annotations

from typing import Any, Optional

import typer

from parvisor.cli.main import JsonOpt, client, emit, out, vm_app
from parvisor.model.sizes import format_size

nic_app = typer.Typer(no_args_is_help=True, help="A VM's network adapters (live or off).")
vm_disk_app = typer.Typer(no_args_is_help=True, help="A VM's disks (live or off).")
vm_app.add_typer(nic_app, name="nic")
vm_app.add_typer(vm_disk_app, name="disk")


# --- vm set / vm show helpers ------------------------------------------------------------------
def set_body(*, memory_hotplug: str | None, dynamic: bool | None, dyn_min: str | None,
             dyn_max: str | None, buffer: int | None, cpu_weight: int | None,
             cpu_limit: int | None, iops: int | None, bandwidth: str | None) -> dict[str, Any]:
    """The hot-add fields of a PATCH /vms/NAME body (absent options are left out)."""
    body: dict[str, Any] = {}
    if memory_hotplug:
        body["memory_hotplug"] = memory_hotplug
    dyn = {k: v for k, v in {"min": dyn_min, "max": dyn_max, "buffer_pct": buffer}.items()
           if v is not None}
    if dynamic is not None or dyn:
        body["dynamic_memory"] = {"enabled": dynamic is not False, **dyn}
    res = {k: v for k, v in {"cpu_weight": cpu_weight, "cpu_limit_pct": cpu_limit,
                             "disk_iops_limit": iops, "disk_bandwidth_limit": bandwidth}.items()
           if v is not None}
    if res:
        body["resources"] = res
    return body


def show_rows(vm: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("memory hot-plug", vm.get("memory_hotplug", "-"))]
    if vm.get("memory_current_bytes"):
        rows.append(("memory now", format_size(vm["memory_current_bytes"])))
    dyn = vm.get("dynamic_memory")
    if dyn:
        rows.append(("dynamic memory", f"min {format_size(dyn['min_bytes'])}, max "
                     f"{format_size(dyn['max_bytes'])}, buffer {dyn['buffer_pct']} %"))
    res = vm.get("resources") or {}
    if res:
        limit = f"{res['cpu_limit_pct']} %" if res["cpu_limit_pct"] else "none"
        iops = res["disk_iops_limit"] or "none"
        bw = f"{format_size(res['disk_bandwidth_bytes'])}/s" if res["disk_bandwidth_bytes"] \
            else "none"
        rows.append(("cpu", f"weight {res['cpu_weight']}, limit {limit}"))
        rows.append(("disk limits", f"iops {iops}, bandwidth {bw}"))
    return rows


def _print_vm(result: dict[str, Any]) -> None:
    from parvisor.cli.vm_commands import show_vm
    show_vm(result["vm"])


# --- vm nic ---------------------------------------------------------------------------------------
@nic_app.command("add")
def nic_add(name: str, switch: str = typer.Option(..., "--switch"),
            vlan: Optional[int] = typer.Option(None, "--vlan", min=1, max=4094),
            mac: Optional[str] = typer.Option(None, "--mac"),
            model: str = typer.Option("virtio", "--model", help="virtio or e1000."),
            as_json: bool = JsonOpt) -> None:
    """Add a network adapter (hot-plugged when the VM runs)."""
    body = {"switch": switch, "vlan": vlan, "mac": mac, "model": model}
    result = client().post(f"/vms/{name}/nics", {k: v for k, v in body.items() if v is not None})
    emit(result, as_json, lambda r: out.print(
        f"{name}: added {r['nic']['id']} ({r['nic']['mac']} on {switch})", markup=False))


@nic_app.command("remove")
def nic_remove(name: str, nic_id: str, as_json: bool = JsonOpt) -> None:
    """Remove a network adapter (the guest must release a hot-plugged one)."""
    result = client().request("DELETE", f"/vms/{name}/nics/{nic_id}")
    emit(result, as_json, lambda r: out.print(f"{name}: removed {nic_id}", markup=False))


# --- vm disk --------------------------------------------------------------------------------------
@vm_disk_app.command("add")
def disk_add(name: str,
             size: Optional[str] = typer.Option(None, "--size", help="New empty disk, e.g. 1G."),
             path: Optional[str] = typer.Option(None, "--path", help="Existing image."),
             bus: Optional[str] = typer.Option(
                 None, "--bus", help="virtio-blk (default) or virtio-scsi (--shared: "
                                     "virtio-scsi)."),
             fmt: Optional[str] = typer.Option(None, "--format", help="qcow2 or raw."),
             readonly: bool = typer.Option(False, "--readonly"),
             shared: Optional[str] = typer.Option(
                 None, "--shared", metavar="PATH",
                 help="Existing raw image written by several VMs at once (guest "
                      "clustering; virtio-scsi, share-rw, cache=none)."),
             as_json: bool = JsonOpt) -> None:
    """Add a disk (hot-plugged when the VM runs); --size disks belong to the VM;
    --shared PATH disks belong to no VM (make one with 'disk create PATH --size S
    --format raw', then add it to each VM of the guest cluster)."""
    body: dict[str, Any] = {"size": size, "path": path, "format": fmt,
                            "readonly": readonly}
    if bus is not None:
        body["bus"] = bus
    if shared is not None:
        if path is not None:
            raise typer.BadParameter("give the image either as --path or as --shared PATH")
        body.update(path=shared, shared=True)
    result = client().post(f"/vms/{name}/disks", {k: v for k, v in body.items() if v is not None})
    emit(result, as_json, lambda r: out.print(
        f"{name}: added {r['disk']['id']} ({r['disk']['path']}"
        f"{', shared' if r['disk'].get('shared') else ''})", markup=False))


@vm_disk_app.command("remove")
def disk_remove(name: str, disk_id: str, as_json: bool = JsonOpt) -> None:
    """Remove a disk (a disk made with --size is deleted with it)."""
    result = client().request("DELETE", f"/vms/{name}/disks/{disk_id}")
    emit(result, as_json, lambda r: out.print(
        f"{name}: removed {disk_id}" + (f", deleted {r['deleted_file']}"
                                        if r.get("deleted_file") else ""), markup=False))
