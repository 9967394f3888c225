"""``parvisor disk …`` and ``parvisor vm cdrom …``: thin wrappers over /v1/disks and
/v1/vms/NAME/cdrom, plus the parser of the ``PATH[,key=value…]`` device options that
``vm create --disk/--disk-size`` accept (CLI syntax only; the API takes JSON objects)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from parvisor.cli.main import JsonOpt, app, client, emit, out, vm_app
from parvisor.errors import InvalidInput
from parvisor.model.sizes import format_size

disk_app = typer.Typer(no_args_is_help=True, help="Disk images (qcow2, raw; VHD/VHDX in).")
cdrom_app = typer.Typer(no_args_is_help=True, help="A VM's CD/DVD drive.")
app.add_typer(disk_app, name="disk")
vm_app.add_typer(cdrom_app, name="cdrom")

FormatOpt = typer.Option("qcow2", "--format", help="qcow2 (default) or raw.")


# --- device option syntax ---------------------------------------------------------------
def split_option(text: str) -> list[str]:
    """Split at ',' like QEMU does: ',,' is a literal comma (for paths that have one)."""
    parts, current, index = [], [], 0
    while index < len(text):
        char = text[index]
        if char == "," and text[index + 1:index + 2] == ",":
            current.append(",")
            index += 2
            continue
        if char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def parse_device_option(text: str, first_key: str, keys: tuple[str, ...],
                        flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """``VALUE[,key=value][,flag]`` → ``{first_key: VALUE, key: value, flag: True}``."""
    first, *rest = split_option(text)
    if not first:
        raise InvalidInput(f"{text!r}: give the {first_key} first (e.g. {first_key}"
                           f"{',bus=virtio-scsi' if 'bus' in keys else ''})")
    result: dict[str, Any] = {first_key: first}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep and key in flags:
            result[key] = True
        elif sep and key in keys:
            result[key] = value
        else:
            known = ", ".join([f"{k}=…" for k in keys] + list(flags))
            raise InvalidInput(f"{text!r}: unknown option {item!r} (known: {known})")
    return result


def disk_options(attach: list[str], sizes: list[str]) -> dict[str, Any]:
    """The body fields of ``vm create`` for ``--disk`` and ``--disk-size``."""
    body: dict[str, Any] = {}
    if attach:
        body["disks"] = [parse_device_option(a, "path", ("bus", "format"),
                                             ("readonly", "shared"))
                         for a in attach]
    if sizes:
        body["new_disks"] = [parse_device_option(s, "size", ("bus", "format")) for s in sizes]
    return body


# --- disk -------------------------------------------------------------------------------
def show_disk(info: dict[str, Any]) -> None:
    actual = info.get("actual_size")
    rows = [("path", info["path"]), ("format", info["format"]),
            ("virtual size", f"{format_size(info['virtual_size'])} ({info['virtual_size']} B)"),
            ("actual size", format_size(actual) if actual is not None else "?")]
    for depth, link in enumerate(info.get("chain", []), start=1):
        rows.append((f"parent {depth}", f"{link['path']} ({link['format']})"))
    if info.get("chain_error"):
        rows.append(("chain problem", info["chain_error"]))
    if info.get("used_by"):
        rows.append(("used by", ", ".join(info["used_by"])))
    for key, value in rows:
        out.print(f"{key + ':':<15}{value}", markup=False, highlight=False)


@disk_app.command("create")
def disk_create(path: str, size: Optional[str] = typer.Option(
                    None, "--size", help="e.g. 10G (default with --parent: the parent's)."),
                fmt: str = FormatOpt,
                parent: Optional[str] = typer.Option(
                    None, "--parent", help="Base image: make a differencing (child) disk."),
                as_json: bool = JsonOpt) -> None:
    """Create an empty disk, or a differencing disk over a read-only parent."""
    body = {"path": path, "size": size, "format": fmt, "parent": parent}
    info = client().post("/disks", {k: v for k, v in body.items() if v is not None})
    emit(info, as_json, show_disk)


@disk_app.command("info")
def disk_info(path: str, as_json: bool = JsonOpt) -> None:
    """Format, virtual and actual size, backing chain, VMs using it."""
    emit(client().get("/disks/info", params={"path": path}), as_json, show_disk)


@disk_app.command("resize")
def disk_resize(path: str, size: str, as_json: bool = JsonOpt) -> None:
    """Grow a disk to SIZE (shrinking is refused: it would cut off guest data)."""
    emit(client().post("/disks/resize", {"path": path, "size": size}), as_json, show_disk)


@disk_app.command("convert")
def disk_convert(source: str, target: str, fmt: str = FormatOpt,
                 source_format: Optional[str] = typer.Option(
                     None, "--source-format", help="qcow2, raw, vpc (VHD), vhdx, vmdk; "
                     "default: detected."),
                 as_json: bool = JsonOpt) -> None:
    """Copy SOURCE (e.g. a VHD/VHDX) into a new TARGET image inside the storage roots."""
    body = {"source": source, "target": target, "format": fmt, "source_format": source_format}
    info = client().post("/disks/convert", {k: v for k, v in body.items() if v is not None})
    emit(info, as_json, show_disk)


@disk_app.command("delete")
def disk_delete(path: str, as_json: bool = JsonOpt) -> None:
    """Delete a disk file (refused while a VM or a differencing child uses it)."""
    result = client().request("DELETE", "/disks", params={"path": path})
    emit(result, as_json, lambda r: out.print(f"deleted {r['deleted']}", markup=False))


# --- vm cdrom ---------------------------------------------------------------------------
@cdrom_app.command("insert")
def cdrom_insert(name: str, iso: str,
                 drive: Optional[str] = typer.Option(None, "--drive", help="Drive id."),
                 as_json: bool = JsonOpt) -> None:
    """Insert an ISO (running VM: at once; stopped VM: from the next start)."""
    body = {"path": iso, **({"drive": drive} if drive else {})}
    result = client().post(f"/vms/{name}/cdrom", body)
    emit(result, as_json, lambda r: out.print(f"{name}: {r['drive']} has {r['path']}",
                                              markup=False))


@cdrom_app.command("eject")
def cdrom_eject(name: str, drive: Optional[str] = typer.Option(None, "--drive"),
                as_json: bool = JsonOpt) -> None:
    """Eject the medium (even if the guest locked the tray)."""
    params = {"drive": drive} if drive else {}
    result = client().request("DELETE", f"/vms/{name}/cdrom", params=params)
    emit(result, as_json, lambda r: out.print(f"{name}: {r['drive']} ejected", markup=False))
