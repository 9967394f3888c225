"""``parvisor vm …`` commands: thin wrappers over /v1/vms."""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer
from rich.table import Table

from parvisor.cli.main import (AutoStart, AutoStop, JsonOpt, client, emit, err, out,
                               run_job, vm_app)
from parvisor.errors import ParvisorError
from parvisor.model.sizes import format_size


def show_vm(vm: dict[str, Any]) -> None:
    rows = [("name", vm["name"]), ("uuid", vm["uuid"]),
            ("state", vm["state"] + (f" ({vm['state_reason']})" if vm["state_reason"] else "")),
            ("host", vm["host"]), ("accelerator", vm["accelerator"]),
            ("vcpus", f"{vm['vcpus']} (max {vm['max_vcpus']})"),
            ("memory", f"{format_size(vm['memory_bytes'])} "
                       f"(max {format_size(vm['max_memory_bytes'])})"),
            ("boot", _boot_text(vm["boot"])), ("heartbeat", vm["heartbeat"]),
            ("ip addresses", ", ".join(vm["ip_addresses"]) or "-"),
            ("pid", vm["pid"] or "-"),
            ("uptime", f"{vm['uptime_s']:.0f} s" if vm["uptime_s"] is not None else "-"),
            ("ha", "yes" if vm["ha"] else "no"),
            ("automatic start", f"{vm['auto_start_action']} (delay {vm['auto_start_delay_s']} s)"),
            ("automatic stop", vm["auto_stop_action"])]
    if vm.get("os_info"):
        rows.append(("guest os", vm["os_info"].get("pretty_name") or str(vm["os_info"])))
    for disk in vm["disks"]:
        size = format_size(disk["size_bytes"]) if disk.get("size_bytes") else "?"
        rows.append((f"disk {disk['id']}", f"{disk['path']} ({disk['format']}, {disk['bus']}, "
                                           f"{size})"))
    for nic in vm["nics"]:
        rows.append((f"nic {nic['id']}", f"{nic['switch']} {nic['mac']} {nic['model']}"))
    if vm["notes"]:
        rows.append(("notes", vm["notes"]))
    for key, value in rows:
        out.print(f"{key + ':':<17}{value}", markup=False, highlight=False)


def _boot_text(boot: dict[str, Any]) -> str:
    if boot["kind"] == "kernel":
        return f"kernel {boot['kernel']}" + (f" + {boot['initrd']}" if boot["initrd"] else "")
    return "from disk"


def _after_action(result: dict[str, Any], as_json: bool, verb: str) -> None:
    if "job" in result:
        api = client()
        job = run_job(api, result["job"], as_json)
        result = {"vm": job["result"], "job": job}
    if result.get("warning") and not as_json:
        err.print(f"warning: {result['warning']}", markup=False, style="yellow")
    vm = result.get("vm") or {}
    emit(result, as_json,
         lambda r: out.print(f"{vm.get('name', '')}: {verb}, now {vm.get('state', '?')}"
                             + (f" ({r['result']})" if r.get("result") else ""), markup=False))


@vm_app.command("create")
def create(name: str,
           cpus: int = typer.Option(1, "--cpus", help="vCPUs."),
           max_cpus: Optional[int] = typer.Option(None, "--max-cpus", help="Hot-add ceiling."),
           memory: str = typer.Option("256M", "--memory", help="e.g. 256M, 1G."),
           max_memory: Optional[str] = typer.Option(None, "--max-memory"),
           image: Optional[str] = typer.Option(None, "--image", help="'tiny': the built-in guest."),
           kernel: Optional[str] = typer.Option(None, "--kernel"),
           initrd: Optional[str] = typer.Option(None, "--initrd"),
           cmdline: Optional[str] = typer.Option(None, "--cmdline"),
           disk: Optional[str] = typer.Option(None, "--disk", help="Boot disk inside a storage root."),
           ha: bool = typer.Option(False, "--ha", help="Highly available (clusters)."),
           auto_start: AutoStart = typer.Option(AutoStart.start_if_running, "--auto-start"),
           auto_start_delay: int = typer.Option(0, "--auto-start-delay", help="Seconds."),
           auto_stop: AutoStop = typer.Option(AutoStop.save, "--auto-stop"),
           notes: str = typer.Option("", "--notes"),
           as_json: bool = JsonOpt) -> None:
    """Define a new VM (it starts off)."""
    body = {"name": name, "vcpus": cpus, "max_vcpus": max_cpus, "memory": memory,
            "max_memory": max_memory, "image": image, "kernel": kernel, "initrd": initrd,
            "cmdline": cmdline, "disk": disk, "ha": ha, "auto_start_action": auto_start.value,
            "auto_start_delay_s": auto_start_delay, "auto_stop_action": auto_stop.value,
            "notes": notes}
    vm = client().post("/vms", {k: v for k, v in body.items() if v is not None})
    emit(vm, as_json, lambda v: out.print(f"{v['name']}: created ({v['uuid']})", markup=False))


@vm_app.command("set")
def set_(name: str,
         cpus: Optional[int] = typer.Option(None, "--cpus"),
         max_cpus: Optional[int] = typer.Option(None, "--max-cpus"),
         memory: Optional[str] = typer.Option(None, "--memory"),
         max_memory: Optional[str] = typer.Option(None, "--max-memory"),
         notes: Optional[str] = typer.Option(None, "--notes"),
         ha: Optional[bool] = typer.Option(None, "--ha/--no-ha"),
         auto_start: Optional[AutoStart] = typer.Option(None, "--auto-start"),
         auto_start_delay: Optional[int] = typer.Option(None, "--auto-start-delay"),
         auto_stop: Optional[AutoStop] = typer.Option(None, "--auto-stop"),
         cmdline: Optional[str] = typer.Option(None, "--cmdline"),
         as_json: bool = JsonOpt) -> None:
    """Change a stopped VM's definition."""
    body = {"vcpus": cpus, "max_vcpus": max_cpus, "memory": memory, "max_memory": max_memory,
            "notes": notes, "ha": ha, "cmdline": cmdline,
            "auto_start_action": auto_start.value if auto_start else None,
            "auto_start_delay_s": auto_start_delay,
            "auto_stop_action": auto_stop.value if auto_stop else None}
    vm = client().request("PATCH", f"/vms/{name}",
                          json={k: v for k, v in body.items() if v is not None})
    emit(vm, as_json, show_vm)


@vm_app.command("list")
def list_(as_json: bool = JsonOpt) -> None:
    """All VMs on this host."""
    vms = client().get("/vms")

    def human(items: list[dict[str, Any]]) -> None:
        table = Table("NAME", "STATE", "VCPUS", "MEMORY", "HEARTBEAT", "UPTIME", box=None)
        for vm in items:
            uptime = f"{vm['uptime_s']:.0f}s" if vm["uptime_s"] is not None else "-"
            table.add_row(vm["name"], vm["state"], str(vm["vcpus"]),
                          format_size(vm["memory_bytes"]), vm["heartbeat"], uptime)
        out.print(table)
    emit(vms, as_json, human)


@vm_app.command("show")
def show(name: str, as_json: bool = JsonOpt) -> None:
    """One VM: definition and runtime facts."""
    emit(client().get(f"/vms/{name}"), as_json, show_vm)


def _simple_action(action: str, verb: str):
    def command(name: str, as_json: bool = JsonOpt) -> None:
        _after_action(client().post(f"/vms/{name}/{action}"), as_json, verb)
    command.__doc__ = f"{verb.capitalize()} a VM."
    return command


for _action, _verb, _doc in (
        ("start", "started", "Start a VM (a saved VM is restored from its saved state)."),
        ("turn-off", "turned off", "Power off at once (a saved VM's state is discarded)."),
        ("pause", "paused", "Freeze the vCPUs."), ("resume", "resumed", "Unfreeze a paused VM."),
        ("save", "saved", "Save memory to disk and stop (start restores it)."),
        ("restore", "restored", "Restore a saved VM.")):
    _command = _simple_action(_action, _verb)
    _command.__doc__ = _doc
    vm_app.command(_action)(_command)


@vm_app.command("shutdown")
def shutdown(name: str, timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Seconds before power-off."), as_json: bool = JsonOpt) -> None:
    """Ask the guest to shut down (guest agent / ACPI); power off after the timeout."""
    body = {"timeout_s": timeout} if timeout else None
    _after_action(client().post(f"/vms/{name}/shutdown", body), as_json, "shut down")


@vm_app.command("restart")
def restart(name: str, timeout: Optional[float] = typer.Option(None, "--timeout"),
            as_json: bool = JsonOpt) -> None:
    """Shut down gracefully, then start again."""
    body = {"timeout_s": timeout} if timeout else None
    _after_action(client().post(f"/vms/{name}/restart", body), as_json, "restarted")


@vm_app.command("delete")
def delete(name: str, force: bool = typer.Option(False, "--force",
                                                 help="Turn off a running VM first."),
           as_json: bool = JsonOpt) -> None:
    """Delete a VM and its files."""
    result = client().request("DELETE", f"/vms/{name}", params={"force": force})
    emit(result, as_json, lambda r: out.print(f"{name}: deleted", markup=False))


@vm_app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(name: str, command: list[str] = typer.Argument(..., help="-- CMD [ARGS...]"),
          timeout: float = typer.Option(60, "--timeout"), as_json: bool = JsonOpt) -> None:
    """Run a command in the guest (through its agent); exit with its status."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        err.print("error: give the command to run after --")
        raise SystemExit(125)
    try:
        result = client().post(f"/vms/{name}/exec", {"argv": command, "timeout_s": timeout})
    except ParvisorError as exc:
        err.print(f"error: {exc.message}", markup=False, highlight=False)
        raise SystemExit(125)
    if as_json:
        emit(result, True)
    else:
        sys.stdout.write(result["stdout"])
        sys.stderr.write(result["stderr"])
    raise SystemExit(result["exit_code"])


@vm_app.command("console")
def console(name: str, log: bool = typer.Option(False, "--log", help="Print the console log."),
            tail: int = typer.Option(65536, "--tail", help="Bytes of log to print.")) -> None:
    """Attach to the serial console (Ctrl-] detaches), or print its log."""
    if log:
        sys.stdout.write(client().get(f"/vms/{name}/console/log",
                                      params={"tail_bytes": tail}))
        return
    from parvisor.cli.console import attach
    attach(name)
