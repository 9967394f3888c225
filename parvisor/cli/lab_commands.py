"""``parvisor lab ...``: the one-machine cluster lab (parvisor.lab.lab). Runs locally
as root (namespaces, links), not through a host service. The lab lives in
``--dir`` / ``PARVISOR_LAB_DIR`` (default /tmp/parvisor-lab)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from parvisor.cli.main import JsonOpt, app, emit, out
from parvisor.lab.lab import Lab, lab_dir_from_env, parse_sites

lab_app = typer.Typer(no_args_is_help=True, help="A failover cluster lab on this machine "
                      "(network namespaces, etcd, one agent per host).")
app.add_typer(lab_app, name="lab")
DirOpt = typer.Option(None, "--dir", envvar="PARVISOR_LAB_DIR", help="Lab directory.")


def _lab(directory: Optional[str]) -> Lab:
    return Lab(lab_dir_from_env(directory))


def _default_image() -> Optional[Path]:
    from parvisor.config import state_dir_from_env
    from parvisor.testing.guest_fixtures import test_image_dir
    for base in (state_dir_from_env(), test_image_dir()):
        if (base / "images" / "tiny").is_dir():
            return (base / "images" / "tiny").resolve()
    return None


@lab_app.command("up")
def up(hosts: int = typer.Option(3, "--hosts", min=1, max=5),
       witness: bool = typer.Option(False, "--witness", help="Add etcd-only witness 'w'."),
       site: List[str] = typer.Option([], "--site", help="NAME:h1,h2 (repeatable)."),
       no_shared: bool = typer.Option(False, "--no-shared-storage"),
       directory: Optional[str] = DirOpt, as_json: bool = JsonOpt) -> None:
    """Build the lab: hosts h1..hN (+ witness), etcd with TLS, one agent per host."""
    lab = _lab(directory)
    try:
        state = lab.up(hosts, witness, parse_sites(site), not no_shared, _default_image())
    except BaseException:
        if (lab.dir / "lab.json").exists():
            lab.down()       # a half-built lab is removed, never left behind
        raise
    emit({"dir": str(lab.dir), "prefix": state.prefix,
          "hosts": {n.name: n.ip for n in state.nodes.values()}}, as_json,
         lambda d: out.print(f"lab up in {d['dir']}: "
                             + ", ".join(f"{k} {v}" for k, v in d["hosts"].items())))


@lab_app.command("status")
def status(directory: Optional[str] = DirOpt, as_json: bool = JsonOpt) -> None:
    """Hosts (link, processes, QEMUs) and the cluster's view (leases, quorum, VMs)."""
    emit(_lab(directory).status(), as_json, _print_status)


def _print_status(data: dict[str, Any]) -> None:
    for name, node in data["nodes"].items():
        role = "witness" if node["witness"] else "host"
        out.print(f"{name:<4} {role:<8} {node['ip']:<14} link {'up' if node['link_up'] else 'DOWN':<5}"
                  f" procs {json.dumps(node['processes'])} qemu {node['qemu_pids']}",
                  markup=False)
    from parvisor.cli.cluster_commands import print_cluster
    print_cluster(data["cluster"])


@lab_app.command("exec", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})
def exec_(ctx: typer.Context, host: str, directory: Optional[str] = DirOpt) -> None:
    """Run a command inside HOST (its namespace, state dir, .venv/bin on PATH)."""
    # only the first "--" is ours: the command's own (``vm exec NAME -- ls -l``) stay
    argv = list(ctx.args[1:]) if ctx.args[:1] == ["--"] else list(ctx.args)
    if not argv:
        raise typer.BadParameter("give a command after --")
    command, env = _lab(directory).exec_argv(host, argv)
    sys.exit(subprocess.run(command, env=env).returncode)


@lab_app.command("fail")
def fail(host: str, directory: Optional[str] = DirOpt) -> None:
    """Power loss: SIGKILL every process of HOST, link down."""
    killed = _lab(directory).fail(host)
    out.print(f"{host}: killed {len(killed)} processes, link down")


@lab_app.command("recover")
def recover(host: str, directory: Optional[str] = DirOpt) -> None:
    """Power back: link up, etcd member and agent start (no VM of its own runs)."""
    _lab(directory).recover(host)
    out.print(f"{host}: recovered")


@lab_app.command("isolate")
def isolate(host: str, directory: Optional[str] = DirOpt) -> None:
    """Cut HOST's network (its processes keep running)."""
    _lab(directory).isolate(host)
    out.print(f"{host}: isolated")


@lab_app.command("heal")
def heal(host: str, directory: Optional[str] = DirOpt) -> None:
    """Restore HOST's network."""
    _lab(directory).heal(host)
    out.print(f"{host}: healed")


@lab_app.command("down")
def down(directory: Optional[str] = DirOpt) -> None:
    """Stop everything the lab started (by PID) and remove its namespaces and links."""
    left = _lab(directory).down()
    if left:
        out.print(f"[red]could not remove: {', '.join(left)}[/red]")
        raise typer.Exit(1)
    out.print("lab removed")
