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
                  f"{' leader' if m['leader'] else ''}"
                  f"{' witness' if m.get('witness') else ''}", markup=False)
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
           etcd: str = typer.Option(..., "--etcd", help="Comma-separated https://IP:2379 "
                                    "URLs, one per etcd member (hosts and witness)."),
           as_json: bool = JsonOpt) -> None:
    """Make the cluster CA and the etcd members' certificates; print how to start each
    member. Then run 'cluster join' on every host, this one too (service stopped)."""
    from parvisor.cluster import admin
    config = _config()
    result = admin.create(config, name, _endpoints(etcd))
    emit(result, as_json, print_created)


def print_created(data: dict[str, Any]) -> None:
    pki = data["pki"]
    out.print(f"cluster {data['cluster']}: CA and etcd certificates in {pki}", markup=False)
    out.print("1. copy that directory to <state>/cluster/pki on every other machine "
              "(hosts and witness; delete ca.key where no host will join)", markup=False)
    out.print("2. start each etcd member on its machine (it runs in the foreground):",
              markup=False)
    for member in data["etcd_members"]:
        out.print(f"   on {member['address']}: {' '.join(member['command'])}", markup=False)
    out.print(f"3. on every host, service stopped: parvisor cluster join {data['cluster']} "
              f"--etcd {','.join(data['endpoints'])}", markup=False)


@cluster_app.command("join")
def join(name: str, etcd: str = typer.Option(..., "--etcd", help="Comma-separated "
                                             "https://IP:2379 URLs of the etcd members."),
         shared_storage: Optional[Path] = typer.Option(
             None, "--shared-storage", help="The cluster storage path as this host mounts "
                                            "it (HA VMs' disks; recovery places VMs only "
                                            "on hosts that have it)."),
         site: str = typer.Option("", "--site", help="Site name (status, site split)."),
         as_json: bool = JsonOpt) -> None:
    """Make this host a member (service stopped; ca.crt + ca.key in <state>/cluster/pki):
    its VM definitions, checkpoints and switches move into the cluster store."""
    from parvisor.cluster import admin
    extra: dict[str, Any] = {"site": site}
    if shared_storage is not None:
        extra["shared_storage"] = shared_storage.absolute()
    result = admin.join(_config(), name, _endpoints(etcd), **extra)
    emit(result, as_json, lambda d: out.print(
        f"{d['host']} is now a member of {name}; moved VMs: "
        f"{', '.join(d['moved_vms']) or 'none'}; start the host service", markup=False))


@cluster_app.command("leave")
def leave(as_json: bool = JsonOpt) -> None:
    """Stop being a member (service stopped, no VM running here). The VMs stay in the
    cluster (the manager places those meant to run on other hosts); this host becomes
    standalone with no VMs."""
    from parvisor.cluster import admin
    result = admin.leave(_config())
    emit(result, as_json, lambda d: out.print(
        f"{d['host']} left {d['left']}; VMs released to the cluster: "
        f"{', '.join(d['released_vms']) or 'none'}; this host is standalone (SQLite) "
        "again", markup=False))


@witness_app.command("serve")
def witness_serve(name: str = typer.Option("witness", "--name", help="Member name, as in "
                                           "--initial-cluster."),
                  listen: str = typer.Option(..., "--listen", help="IP address."),
                  initial_cluster: str = typer.Option(..., "--initial-cluster",
                                                      help="name=https://ip:2380,..."),
                  data_dir: Optional[Path] = typer.Option(
                      None, "--data-dir", help="Default <state>/cluster/etcd-NAME."),
                  pki: Optional[Path] = typer.Option(
                      None, "--pki", help="ca.crt + etcd-<ip>.crt/key; default "
                                          "<state>/cluster/pki."),
                  existing: bool = typer.Option(False, "--existing", help="Rejoin a "
                                                "running cluster with a fresh data dir."),
                  token: str = typer.Option("parvisor", "--token")) -> None:
    """Run only an etcd member in the foreground: a quorum witness at a third site, or
    a host's own member (the commands 'cluster create' prints). No VMs, no agent."""
    from parvisor.cluster import admin, certs
    from parvisor.config import state_dir_from_env
    from parvisor.errors import NotFound
    state = state_dir_from_env(STATE["state_dir"])
    pki = pki or state / "cluster" / "pki"
    data_dir = data_dir or state / "cluster" / f"etcd-{name}"
    server = certs.CertPair(pki / f"etcd-{listen}.crt", pki / f"etcd-{listen}.key")
    for needed in (pki / "ca.crt", server.cert, server.key):
        if not needed.exists():
            raise NotFound(f"{needed} is missing: copy the pki directory 'cluster create' "
                           "made to this machine")
    argv = admin.etcd_argv(name, listen, data_dir, initial_cluster,
                           "existing" if existing else "new", server, pki / "ca.crt", token)
    os.execv(argv[0], argv)


@host_app.command("drain")
def drain(name: str, as_json: bool = JsonOpt) -> None:
    """Maintenance: no new VMs on NAME; its running VMs live-migrate to other hosts
    (quick migration if that fails, then shut down and started elsewhere)."""
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
