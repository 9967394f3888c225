"""``parvisor vm …`` commands: thin wrappers over /v1/vms."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from parvisor.cli.disk_commands import disk_options
from parvisor.cli.hotplug_commands import set_body, show_rows
from parvisor.cli.main import (AutoStart, AutoStop, JsonOpt, client, emit, err, out,
                               run_job, vm_app)
from parvisor.errors import ParvisorError
from parvisor.model.sizes import format_size
from parvisor.ops.nics import parse_nic_option


def show_vm(vm: dict[str, Any]) -> None:
    rows = [("name", vm["name"]), ("uuid", vm["uuid"]),
            ("state", vm["state"] + (f" ({vm['state_reason']})" if vm["state_reason"] else "")),
            ("host", vm["host"]), ("accelerator", vm["accelerator"]),
            ("vcpus", f"{vm['vcpus']} (max {vm['max_vcpus']})"),
            ("memory", f"{format_size(vm['memory_bytes'])} "
                       f"(max {format_size(vm['max_memory_bytes'])})"),
            *show_rows(vm),
            ("boot", _boot_text(vm["boot"])), ("heartbeat", vm["heartbeat"]),
            ("ip addresses", ", ".join(vm["ip_addresses"]) or "-"),
            ("pid", vm["pid"] or "-"),
            ("uptime", f"{vm['uptime_s']:.0f} s" if vm["uptime_s"] is not None else "-"),
            ("ha", (f"yes, priority {vm.get('ha_priority', 'medium')}" if vm["ha"] else "no")
             + (f", {vm['ha_status']}" if vm.get("ha_status") else "")),
            *([("migration", vm["migration"])] if vm.get("migration") else []),
            ("automatic start", f"{vm['auto_start_action']} (delay {vm['auto_start_delay_s']} s)"),
            ("automatic stop", vm["auto_stop_action"])]
    if vm.get("os_info"):
        rows.append(("guest os", vm["os_info"].get("pretty_name") or str(vm["os_info"])))
    for disk in vm["disks"]:
        size = format_size(disk["size_bytes"]) if disk.get("size_bytes") else "?"
        rows.append((f"{'cd' if disk.get('media') == 'cdrom' else 'disk'} {disk['id']}",
                     f"{disk['path'] or '(empty)'} ({disk['format']}, {disk['bus']}, {size}"
                     f"{', shared' if disk.get('shared') else ''})"))
    for nic in vm["nics"]:
        vlan = f" vlan {nic['vlan']}" if nic.get("vlan") else ""
        rows.append((f"nic {nic['id']}", f"{nic['switch']}{vlan} {nic['mac']} {nic['model']}"))
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


def _cloud_init_body(user_data_file: str | None, ssh_keys: list[str]) -> dict[str, Any]:
    """Read the user-data and key files here, on the client: the service never opens
    user-named files (it may run on another machine, as another user)."""
    body: dict[str, Any] = {}
    try:
        if user_data_file is not None:
            body["cloud_init_user_data"] = Path(user_data_file).read_text()
        keys = []
        for key in ssh_keys:
            path = Path(key).expanduser()
            keys.append(path.read_text().strip() if path.is_file() else key)
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"error: {exc}", markup=False)
        raise SystemExit(1)
    if keys:
        body["ssh_keys"] = keys
    return body


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
           disk: list[str] = typer.Option(
               [], "--disk", help="Existing disk in a storage root: PATH[,bus=B][,format=F]"
               "[,readonly][,shared]; repeatable, the first boots (bus: virtio-blk, "
               "virtio-scsi, ide, ahci; shared: a raw image several VMs write, "
               "guest clustering)."),
           disk_size: list[str] = typer.Option(
               [], "--disk-size", help="New empty data disk: SIZE[,bus=B][,format=F]; "
               "repeatable, deleted with the VM."),
           cdrom: Optional[str] = typer.Option(None, "--cdrom", help="ISO for a CD/DVD drive."),
           boot_order: Optional[str] = typer.Option(
               None, "--boot-order", help="Device ids, e.g. cd0,disk0."),
           nic: Optional[list[str]] = typer.Option(
               None, "--nic", help="SWITCH[,vlan=N][,mac=M][,model=virtio|e1000]; repeatable."),
           generation: int = typer.Option(1, "--generation", min=1, max=2,
                                          help="1: BIOS (SeaBIOS); 2: UEFI (OVMF)."),
           secure_boot: bool = typer.Option(False, "--secure-boot",
                                            help="UEFI secure boot (generation 2)."),
           tpm: bool = typer.Option(False, "--tpm", help="A virtual TPM 2.0 (swtpm)."),
           os_type: str = typer.Option("linux", "--os", help="linux, windows or other."),
           boot: Optional[str] = typer.Option(
               None, "--boot", help="With --image tiny: 'kernel' (default) or 'disk' (a "
                                    "differencing child of the tiny guest's disk)."),
           cloud_init: Optional[str] = typer.Option(
               None, "--cloud-init", help="user-data file for a cloud-init NoCloud seed."),
           ssh_key: Optional[list[str]] = typer.Option(
               None, "--ssh-key", help="Public key file or key text; repeatable."),
           ha: bool = typer.Option(False, "--ha", help="Highly available (clusters)."),
           ha_priority: str = typer.Option("medium", "--ha-priority",
                                           help="high, medium, low or none."),
           anti_affinity: Optional[str] = typer.Option(None, "--anti-affinity"),
           preferred_hosts: str = typer.Option("", "--preferred-hosts", help="h1,h2"),
           auto_start: AutoStart = typer.Option(AutoStart.start_if_running, "--auto-start"),
           auto_start_delay: int = typer.Option(0, "--auto-start-delay", help="Seconds."),
           auto_stop: AutoStop = typer.Option(AutoStop.save, "--auto-stop"),
           notes: str = typer.Option("", "--notes"),
           as_json: bool = JsonOpt) -> None:
    """Define a new VM (it starts off)."""
    body = {"name": name, "vcpus": cpus, "max_vcpus": max_cpus, "memory": memory,
            "max_memory": max_memory, "image": image, "kernel": kernel, "initrd": initrd,
            "cmdline": cmdline, "cdrom": cdrom, "ha": ha, "auto_start_action": auto_start.value,
            "ha_priority": ha_priority, "anti_affinity": anti_affinity,
            "preferred_hosts": [h for h in preferred_hosts.split(",") if h],
            "auto_start_delay_s": auto_start_delay, "auto_stop_action": auto_stop.value,
            "notes": notes, "nics": [parse_nic_option(n) for n in nic or []]}
    body.update(disk_options(disk, disk_size))
    body.update({"generation": generation, "secure_boot": secure_boot, "tpm": tpm,
                 "os_type": os_type, "boot": boot,
                 **_cloud_init_body(cloud_init, ssh_key or [])})
    if boot_order is not None:
        body["boot_order"] = [x for x in boot_order.split(",") if x]
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
         ha_priority: Optional[str] = typer.Option(None, "--ha-priority"),
         anti_affinity: Optional[str] = typer.Option(None, "--anti-affinity",
                                                     help="Group; '' clears."),
         preferred_hosts: Optional[str] = typer.Option(None, "--preferred-hosts"),
         auto_start: Optional[AutoStart] = typer.Option(None, "--auto-start"),
         auto_start_delay: Optional[int] = typer.Option(None, "--auto-start-delay"),
         auto_stop: Optional[AutoStop] = typer.Option(None, "--auto-stop"),
         cmdline: Optional[str] = typer.Option(None, "--cmdline"),
         boot_order: Optional[str] = typer.Option(
             None, "--boot-order", help="Device ids, e.g. disk0,cd0 ('' clears)."),
         memory_hotplug: Optional[str] = typer.Option(
             None, "--memory-hotplug", help="virtio-mem or dimm (VM off)."),
         dynamic: Optional[bool] = typer.Option(None, "--dynamic-memory/--no-dynamic-memory"),
         dyn_min: Optional[str] = typer.Option(None, "--min", help="Dynamic memory min."),
         dyn_max: Optional[str] = typer.Option(None, "--max", help="Dynamic memory max."),
         buffer: Optional[int] = typer.Option(None, "--buffer", help="Dynamic memory buffer %."),
         cpu_weight: Optional[int] = typer.Option(None, "--cpu-weight", help="1-10000 (100)."),
         cpu_limit: Optional[int] = typer.Option(None, "--cpu-limit", help="% of its vCPUs; 0: none."),
         disk_iops: Optional[int] = typer.Option(None, "--disk-iops-limit", help="0: none."),
         disk_bw: Optional[str] = typer.Option(None, "--disk-bandwidth-limit",
                                               help="Bytes/s, e.g. 20M; 0: none."),
         as_json: bool = JsonOpt) -> None:
    """Change a VM: any setting while off; --cpus, --memory, dynamic-memory bounds and
    resource limits also while it runs (hot-add, see docs/hot-add.md)."""
    body = {"vcpus": cpus, "max_vcpus": max_cpus, "memory": memory, "max_memory": max_memory,
            "notes": notes, "ha": ha, "cmdline": cmdline, "ha_priority": ha_priority,
            "anti_affinity": anti_affinity,
            "preferred_hosts": [h for h in preferred_hosts.split(",") if h]
            if preferred_hosts is not None else None,
            "boot_order": [x for x in boot_order.split(",") if x] if boot_order is not None
            else None,
            "auto_start_action": auto_start.value if auto_start else None,
            "auto_start_delay_s": auto_start_delay,
            "auto_stop_action": auto_stop.value if auto_stop else None,
            **set_body(memory_hotplug=memory_hotplug, dynamic=dynamic, dyn_min=dyn_min,
                       dyn_max=dyn_max, buffer=buffer, cpu_weight=cpu_weight,
                       cpu_limit=cpu_limit, iops=disk_iops, bandwidth=disk_bw)}
    vm = client().request("PATCH", f"/vms/{name}",
                          json={k: v for k, v in body.items() if v is not None})
    emit(vm, as_json, show_vm)


@vm_app.command("list")
def list_(as_json: bool = JsonOpt) -> None:
    """All VMs on this host."""
    vms = client().get("/vms")

    def human(items: list[dict[str, Any]]) -> None:
        table = Table("NAME", "STATE", "HOST", "VCPUS", "MEMORY", "HEARTBEAT", "UPTIME",
                      box=None)
        for vm in items:
            uptime = f"{vm['uptime_s']:.0f}s" if vm["uptime_s"] is not None else "-"
            table.add_row(vm["name"], vm["state"], vm["host"], str(vm["vcpus"]),
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


@vm_app.command("exec")
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
