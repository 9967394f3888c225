"""``parvisor import vmc|disk|ovf``: thin wrappers over ``POST /v1/imports/*``.

Each command sends one request, follows the ``import`` job with a progress bar
(``run_job``) and prints the new VM and the attention report (what to fix inside the
guest). Paths are made absolute here because the service resolves them, not the shell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from parvisor.cli.main import JsonOpt, app, client, emit, out, run_job
from parvisor.errors import InvalidInput
from parvisor.ops.nics import parse_nic_option

import_app = typer.Typer(no_args_is_help=True,
                         help="Bring VMs in: Virtual Server/Virtual PC .vmc, OVF/OVA, disks.")
app.add_typer(import_app, name="import")

SwitchOpt = typer.Option(None, "--switch", help="SW: every network to switch SW; "
                         "NETWORK=SW: one network (repeatable).")


def switch_map(items: list[str] | None) -> dict[str, str]:
    """``--switch SW`` maps every network ("*"), ``--switch NAME=SW`` one network."""
    result: dict[str, str] = {}
    for item in items or []:
        network, sep, switch = item.rpartition("=")
        if sep and not (network and switch):
            raise InvalidInput(f"--switch {item!r}: use SW or NETWORK=SW")
        result[network if sep else "*"] = switch
    return result


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _run(kind: str, body: dict[str, Any], as_json: bool) -> None:
    api = client()
    job = run_job(api, api.post(f"/imports/{kind}", body)["job"], as_json)
    emit(job["result"], as_json, show_import)


def show_import(result: dict[str, Any]) -> None:
    vm = result["vm"]
    out.print(f"imported VM {vm['name']} ({vm['uuid']}) from {result['source']}",
              markup=False, highlight=False)
    for disk in result["disks"]:
        out.print(f"  {disk['id']}: {disk['path']} ({disk['virtual_size']} bytes)",
                  markup=False, highlight=False)
    if result["attention"]:
        out.print("needs attention:", markup=False)
        for item in result["attention"]:
            out.print(f"  - {item['message']}", markup=False, highlight=False)
    out.print(f"start it with: parvisor vm start {vm['name']}", markup=False)


@import_app.command("vmc")
def import_vmc(path: str = typer.Argument(..., help="The .vmc file (VHDs beside it)."),
               name: Optional[str] = typer.Option(None, "--name", help="VM name "
                                                  "(default: the .vmc's name)."),
               switch: Optional[list[str]] = SwitchOpt,
               undo: Optional[str] = typer.Option(None, "--undo",
                                                  help="commit|discard pending undo disks."),
               saved_state: Optional[str] = typer.Option(
                   None, "--saved-state", help="discard: import a saved VM as turned off."),
               skip_missing: bool = typer.Option(False, "--skip-missing",
                                                 help="Import without disks not found."),
               as_json: bool = JsonOpt) -> None:
    """Import a Virtual Server 2005 / Virtual PC VM (VHDs, differencing chains too)."""
    _run("vmc", {"path": _absolute(path), "name": name, "switches": switch_map(switch),
                 "undo": undo, "saved_state": saved_state, "skip_missing": skip_missing},
         as_json)


@import_app.command("disk")
def import_disk(path: str = typer.Argument(..., help="Disk image (read only)."),
                name: str = typer.Option(..., "--name", help="VM name."),
                fmt: Optional[str] = typer.Option(
                    None, "--format", help="raw|qcow2|vmdk|vpc|vhdx (default: by magic)."),
                cpus: int = typer.Option(1, "--cpus", min=1),
                memory: str = typer.Option("1G", "--memory"),
                bus: str = typer.Option("ide", "--bus", help="ide|ahci|virtio-blk|"
                                        "virtio-scsi (ide boots any OS)."),
                os_type: str = typer.Option("other", "--os-type",
                                            help="linux|windows|other"),
                nic: Optional[list[str]] = typer.Option(
                    None, "--nic", help="SWITCH[,vlan=N][,mac=M][,model=virtio|e1000]."),
                as_json: bool = JsonOpt) -> None:
    """P2V: create a VM around an existing disk image (converted to qcow2)."""
    _run("disk", {"path": _absolute(path), "name": name, "format": fmt, "vcpus": cpus,
                  "memory": memory, "bus": bus, "os_type": os_type,
                  "nics": [parse_nic_option(n) for n in nic or []]}, as_json)


@import_app.command("ovf")
def import_ovf(path: str = typer.Argument(..., help="An .ovf (disks beside it) or .ova."),
               name: Optional[str] = typer.Option(None, "--name", help="VM name."),
               switch: Optional[list[str]] = SwitchOpt,
               as_json: bool = JsonOpt) -> None:
    """Import an OVF package or OVA archive (VirtualBox, VMware exports)."""
    _run("ovf", {"path": _absolute(path), "name": name, "switches": switch_map(switch)},
         as_json)
