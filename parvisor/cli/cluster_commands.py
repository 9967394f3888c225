"""``parvisor cluster ...`` and ``parvisor host drain|resume``.

``status`` and drain/resume ask the running service (API). ``create``, ``join`` and
``leave`` change this host's config.toml and must run while its service is stopped
(they change which store it opens); ``witness serve`` runs only an etcd member.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from parvisor.cli.main import STATE, JsonOpt, app, client, emit, host_app, out

cluster_app = typer.Typer(no_args_is_help=True, help="Failover cluster on etcd.")
app.add_typer(cluster_app, name="cluster")
witness_app = typer.Typer(no_args_is_help=True, help="Quorum witness (etcd only).")
cluster_app.add_typer(witness_app, name="witness")


def _config():
    from parvisor.config import load_config, state_dir_from_env
    return load_config(state_dir_from_env(STATE["state_dir"]))


def _endpoints(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def print_cluster(data: dict[str, Any]) -> None:
    quorum = "yes" if data.get("quorum") else f"NO ({data.get('error', '')})"
    out.print(f"cluster {data['cluster']}: quorum {quorum}, manager {data.get('manager')}",
              markup=False)
    for m in data.get("etcd", []):
        out.print(f"  etcd {m['name']:<6} {'voter' if m['voter'] else 'learner':<8}"
                  f" {'reachable' if m['reachable'] else 'UNREACHABLE':<12}"
                  f"{' leader' if m['leader'] else ''}", markup=False)
    for h in data.get("hosts", []):
        age = "-" if h["lease_age_s"] is None else f"{h['lease_age_s']}/{h['lease_ttl_s']} s"
        vms = [v["name"] for v in data.get("vms", []) if v["host"] == h["name"]]
        out.print(f"  host {h['name']:<6} {h['health']:<12} lease age {age:<10} site "
                  f"{h['site'] or '-':<6} vms {', '.join(vms) or '-'}", markup=False)
    for v in data.get("vms", []):
        reason = f" ({v['reason']})" if v["reason"] else ""
        out.print(f"  vm {v['name']:<12} on {v['host'] or '-':<6} {v['phase']}{reason}"
                  f"{' HA' if v['ha'] else ''}", markup=False)


@cluster_app.command("status")
def status(as_json: bool = JsonOpt) -> None:
    """Hosts (health, lease age), etcd quorum and voters, manager, VMs per host."""
    emit(client().get("/cluster"), as_json, print_cluster)


@cluster_app.command("create")
def create(name: str,
           etcd: str = typer.Option(..., "--etcd", help="Comma-separated https:// URLs."),
           as_json: bool = JsonOpt) -> None:
    """Make the cluster CA and certificates, join this host (service stopped)."""
    from parvisor.cluster import admin
    config = _config()
    endpoints = _endpoints(etcd)
    ca = admin.ensure_ca(admin.pki_dir(config), name, create=True)
    admin.etcd_server_certs(ca, admin.pki_dir(config), endpoints)
    _join(config, name, endpoints, as_json, created=True)


@cluster_app.command("join")
def join(name: str, etcd: str = typer.Option(..., "--etcd"),
         as_json: bool = JsonOpt) -> None:
    """Join an existing cluster (copy ca.crt + ca.key into <state>/cluster/pki first)."""
    _join(_config(), name, _endpoints(etcd), as_json, created=False)


def _join(config, name: str, endpoints: list[str], as_json: bool, created: bool) -> None:
    from parvisor.cluster import admin
    from parvisor.cluster.etcd_kv import EtcdKV
    from parvisor.cluster.runtime import tls_of
    settings = admin.settings_for(config, name, endpoints, admin.pki_dir(config))
    kv = EtcdKV(endpoints, tls=tls_of(settings))
    try:
        admin.check_reachable(kv)
        moved = admin.move_definitions(config, settings, kv)
    except Exception as exc:      # noqa: BLE001 - report and stop before writing config
        raise typer.BadParameter(f"{exc}; start the etcd members with the server "
                                 f"certificates in {admin.pki_dir(config)} "
                                 "(parvisor cluster witness serve shows the flags)") from exc
    admin.write_cluster_section(config, settings)
    emit({"cluster": name, "host": settings.host, "moved_vms": moved, "created": created},
         as_json, lambda d: out.print(f"{d['host']} is now a member of {name}; moved VMs: "
                                      f"{', '.join(moved) or 'none'}; restart the service"))


@cluster_app.command("leave")
def leave(as_json: bool = JsonOpt) -> None:
    """Stop being a member (service stopped; VM definitions stay in the cluster)."""
    from parvisor.cluster import admin
    admin.remove_cluster_section(_config())
    emit({"left": True}, as_json, lambda _: out.print("left the cluster; this host is "
                                                      "standalone (SQLite) again"))


@witness_app.command("serve")
def witness_serve(name: str = typer.Option("witness", "--name"),
                  listen: str = typer.Option(..., "--listen", help="IP address."),
                  initial_cluster: str = typer.Option(..., "--initial-cluster",
                                                      help="name=https://ip:2380,..."),
                  data_dir: Path = typer.Option(..., "--data-dir"),
                  pki: Path = typer.Option(..., "--pki", help="ca.crt + etcd-<ip>.crt/key"),
                  existing: bool = typer.Option(False, "--existing"),
                  token: str = typer.Option("parvisor", "--token")) -> None:
    """Run only an etcd member (a quorum witness at a third site; no VMs, no agent)."""
    from parvisor.cluster import admin, certs
    server = certs.CertPair(pki / f"etcd-{listen}.crt", pki / f"etcd-{listen}.key")
    argv = admin.etcd_argv(name, listen, data_dir, initial_cluster,
                           "existing" if existing else "new", server, pki / "ca.crt", token)
    os.execv(argv[0], argv)


@host_app.command("drain")
def drain(name: str, as_json: bool = JsonOpt) -> None:
    """Maintenance: no new VMs on NAME; its VMs are SHUT DOWN and started on other hosts
    (no live migration yet)."""
    emit(client().post(f"/cluster/hosts/{name}/drain"), as_json,
         lambda d: out.print(f"{name}: draining: {d['note']}"))


@host_app.command("resume")
def resume(name: str, as_json: bool = JsonOpt) -> None:
    """End maintenance on NAME."""
    emit(client().post(f"/cluster/hosts/{name}/resume"), as_json,
         lambda d: out.print(f"{name}: {d['note']}"))


@cluster_app.command("cpu-baseline")
def cpu_baseline(model: str = typer.Argument(
        ..., help="A QEMU CPU model every host runs, 'auto' (the best such model) or "
                  "'none' (host CPU passthrough)."),
        as_json: bool = JsonOpt) -> None:
    """Processor compatibility: the CPU model every VM starts with, so VMs can live-
    migrate between hosts with different CPUs (applies from each VM's next start)."""
    result = client().request("PUT", "/cluster/cpu-baseline", json={"model": model})
    emit(result, as_json, lambda r: out.print(
        f"cluster CPU baseline: {r['cpu_baseline'] or 'none (host CPU)'}; {r['note']}",
        markup=False))
