"""Cluster administration done on one host's state dir: ``cluster create|join|leave``,
the etcd member command line (``cluster witness serve`` and the lab), and moving a
standalone host's definitions from SQLite into etcd.

What for: these run with the host service *stopped* (they change which store the
service opens); the service picks the cluster up at its next start. The PKI lives in
``<state>/cluster/pki``: ``ca.crt``/``ca.key`` (copy both to a joining host, over a
channel you trust, then delete ``ca.key`` where it is not needed), ``etcd-<ip>``
server certificates, ``host-<name>`` client certificates.

The steps (docs/cluster.md "Create / join", tests/integration/test_cluster_admin.py):
``create`` makes the CA and one server certificate per etcd endpoint and returns the
command that starts each member (etcd cannot answer before its certificate exists, so
create joins nobody); ``join`` (on every host, the first one too) issues this host's
client certificate, checks etcd, moves the SQLite definitions into etcd, retires the
SQLite database and writes ``[cluster]``; ``leave`` releases this host's VMs to the
cluster and removes ``[cluster]``: the VMs stay cluster VMs, the host starts empty.

Never: overwrite an existing CA (that would lock every member out); start a second
copy of a running VM while moving definitions (a running VM gets *this* host as its
owner in the same step, so the manager never places it elsewhere); run while the
service runs; release a VM whose QEMU still runs here (another host would start it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from parvisor.cluster import certs
from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import (EtcdKV, TlsFiles, cmp_absent, cmp_mod, op_delete,
                                      op_put)
from parvisor.cluster.settings import CLUSTER_API_PORT, ClusterSettings
from parvisor.cluster.host_api import ensure_api_certificate
from parvisor.config import HostConfig
from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.model.states import ACTIVE_STATES
from parvisor.procfs import pid_alive
from parvisor.store.etcd import EtcdStore, Keys

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
CLIENT_PORT, PEER_PORT = 2379, 2380     # what ``etcd_argv`` listens on


def pki_dir(config: HostConfig) -> Path:
    return config.state_dir / "cluster" / "pki"


def etcd_data_dir(config: HostConfig, member: str) -> Path:
    return config.state_dir / "cluster" / f"etcd-{member}"


# --- checks (nothing changes when one fails) ----------------------------------------------
def check_endpoints(endpoints: list[str]) -> list[str]:
    """https://IP[:2379] each: members started by ``witness serve`` listen there."""
    if not endpoints:
        raise InvalidInput("--etcd needs at least one https://IP:2379 URL")
    hosts = []
    for url in endpoints:
        parts = urlsplit(url)
        try:
            ipaddress.ip_address(parts.hostname or "")
            port = parts.port
        except ValueError:
            raise InvalidInput(f"etcd endpoint {url!r}: use https://IP:{CLIENT_PORT} "
                               "(an IP address: etcd listens on addresses)") from None
        if parts.scheme != "https" or port not in (None, CLIENT_PORT) or parts.path.strip("/"):
            raise InvalidInput(f"etcd endpoint {url!r}: use https://IP:{CLIENT_PORT} "
                               "(TLS; members listen on port 2379)")
        hosts.append(parts.hostname or "")
    if len(set(hosts)) != len(hosts):
        raise InvalidInput(f"etcd endpoints repeat an address: {', '.join(endpoints)}")
    return hosts


def check_not_member(config: HostConfig) -> None:
    if config.cluster is not None or _has_cluster_section(config.config_file):
        name = (config.cluster or {}).get("name", "?")
        raise AlreadyExists(f"this host is already a member of cluster {name!r} "
                            f"([cluster] in {config.config_file}); 'cluster leave' first")


def check_service_stopped(config: HostConfig) -> None:
    """The service must not run: it holds the store open (and, in a cluster, a lease)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(config.api_socket))
        except OSError:
            return
    raise InvalidInput(
        f"the host service is running (it answers on {config.api_socket}): stop it "
        "first; cluster create/join/leave change which store it opens")


def _has_cluster_section(path: Path) -> bool:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return "\n[cluster]" in "\n" + text


# --- create ---------------------------------------------------------------------------------
def create(config: HostConfig, name: str, endpoints: list[str]) -> dict:
    """The cluster's CA and etcd server certificates, and how to start each member."""
    check_name(name)
    hosts = check_endpoints(endpoints)
    check_not_member(config)
    ca = ensure_ca(pki_dir(config), name, create=True)
    etcd_server_certs(ca, pki_dir(config), endpoints)
    members = member_plan(hosts)
    return {"cluster": name, "pki": str(pki_dir(config)), "endpoints": endpoints,
            "etcd_members": members}


def check_name(name: str) -> None:
    from parvisor.model.vm import validate_name
    try:
        validate_name(name, "cluster name")
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


def member_plan(hosts: list[str]) -> list[dict]:
    """Member names m1..mN in endpoint order, and the command that starts each."""
    names = [f"m{i}" for i in range(1, len(hosts) + 1)]
    initial = ",".join(f"{n}=https://{h}:{PEER_PORT}" for n, h in zip(names, hosts))
    return [{"name": n, "address": h, "certificate": f"etcd-{h}.crt",
             "command": ["parvisor", "cluster", "witness", "serve", "--name", n,
                         "--listen", h, "--initial-cluster", initial]}
            for n, h in zip(names, hosts)]


def ensure_ca(directory: Path, cluster: str, *, create: bool) -> certs.CertPair:
    pair = certs.CertPair(directory / "ca.crt", directory / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        if create:
            raise AlreadyExists(f"{directory} already holds a cluster CA; refusing to "
                                "replace it (members trust it): run 'cluster join' to make "
                                "this host a member")
        return pair
    if not create:
        raise NotFound(f"no cluster CA in {directory}: copy ca.crt and ca.key from the "
                       "host that ran 'cluster create'")
    return certs.make_ca(directory, cluster)


def etcd_server_certs(ca: certs.CertPair, directory: Path, endpoints: list[str]) -> None:
    """One server certificate per etcd endpoint host (SAN: its address)."""
    for url in endpoints:
        host = urlsplit(url).hostname or ""
        certs.issue(ca, directory, f"etcd-{host}", server=True,
                    hosts=(host, "127.0.0.1", "localhost"))


# --- join -----------------------------------------------------------------------------------
def join(config: HostConfig, name: str, endpoints: list[str], **options: object) -> dict:
    """Make this host a member: checks first (nothing changes when one fails), then
    the definitions move into etcd, the SQLite database is retired, ``[cluster]`` is
    written. ``options``: other ``ClusterSettings`` fields (shared_storage, site ...)."""
    shared = options.get("shared_storage")
    if shared is not None and not Path(str(shared)).is_dir():
        raise InvalidInput(f"--shared-storage {shared}: not a directory on this host")
    check_name(name)
    check_endpoints(endpoints)
    check_not_member(config)
    check_service_stopped(config)
    ca = ensure_ca(pki_dir(config), name, create=False)
    settings = ClusterSettings(name=name, host=config.host_name, endpoints=tuple(endpoints),
                               ca=ca.cert, cert=pki_dir(config) / f"host-{config.host_name}.crt",
                               key=pki_dir(config) / f"host-{config.host_name}.key",
                               **{"api_port": CLUSTER_API_PORT, **options})  # type: ignore[arg-type]
    settings.check()
    certs.issue(ca, pki_dir(config), f"host-{config.host_name}", server=False)
    # the cluster API's server certificate, while ca.key is here (parvisor.cluster.host_api)
    ensure_api_certificate(settings, config.state_dir / "cluster")
    kv = EtcdKV(endpoints, timeout_s=2.0, tls=tls_files(settings))
    check_reachable(kv, endpoints)
    moved = move_definitions(config, settings, kv)
    retired = retire_database(config, name)
    write_cluster_section(config, settings)
    return {"cluster": name, "host": settings.host, "moved_vms": moved,
            "sqlite_kept_as": str(retired) if retired else None}


def tls_files(settings: ClusterSettings) -> TlsFiles:
    return TlsFiles(str(settings.ca), str(settings.cert), str(settings.key))


def check_reachable(kv: EtcdKV, endpoints: list[str]) -> None:
    try:
        kv.status()
        kv.get("/parvisor-join-probe")     # a read needs quorum: status alone does not
    except ClusterUnavailable as exc:
        raise ClusterUnavailable(
            f"etcd is not reachable at {', '.join(endpoints)} with this host's certificate "
            f"({exc.message}); nothing was changed. Are the members started "
            "('parvisor cluster witness serve', see 'cluster create') and the CA the "
            "cluster's?") from exc


def move_definitions(config: HostConfig, settings: ClusterSettings, kv: EtcdKV) -> list[str]:
    """Copy every SQLite VM (with its checkpoints) and switch into etcd; a VM active
    here becomes owned by this host, a VM with disks on local storage gets this host as
    its disk host. Re-running after an interruption skips what an
    earlier run moved (same VM uuid)."""
    from parvisor.cluster.vm_ops import local_disk_paths
    from parvisor.store.sqlite import SqliteStore
    if not config.database.exists():
        return []
    local = SqliteStore(config.database)
    store, keys = EtcdStore(kv, settings.name), Keys(f"/parvisor/{settings.name}/")
    try:
        records = local.list_vms()
        in_cluster = {r.name: r.uuid for r in store.list_vms()}
        clashes = sorted(r.name for r in records
                         if in_cluster.get(r.name, r.uuid) != r.uuid)
        if clashes:
            raise AlreadyExists(f"the cluster already has VMs named {', '.join(clashes)}: "
                                "rename them here first (nothing was moved)")
        for record in records:
            if record.uuid not in in_cluster.values():
                store.create_vm(record.definition)
                store.set_state(record.uuid, record.state, record.state_reason,
                                desired_state=record.desired_state)
            _move_checkpoints(local, store, record.uuid)
            if record.state in ACTIVE_STATES:
                _own_here(kv, keys, record.uuid, settings.host)
            if local_disk_paths(record.definition, settings.shared_storage):
                # its disks stay on this host's local storage: it runs here only
                kv.txn([cmp_absent(keys.disk_host(record.uuid))],
                       [op_put(keys.disk_host(record.uuid), settings.host)])
        cluster_switches = {doc["name"] for doc in store.list_switches()}
        for doc in local.list_switches():
            # same-named switches are one switch, as in Hyper-V (VMs move between them)
            if doc["name"] not in cluster_switches:
                store.put_switch(doc["name"], doc, create=True)
    finally:
        local.close()
    return [r.name for r in records]


def _move_checkpoints(local, store: EtcdStore, vm_uuid: str) -> None:
    there = {doc["id"] for doc in store.list_checkpoints(vm_uuid)}
    current = local.current_checkpoint(vm_uuid)
    for doc in local.list_checkpoints(vm_uuid):      # oldest first: parents before children
        if doc["id"] not in there:
            store.put_checkpoint(doc, create=True, make_current=doc["id"] == current)


def _own_here(kv: EtcdKV, keys: Keys, vm_uuid: str, host: str) -> None:
    ok, revision, _ = kv.txn([cmp_absent(keys.owner(vm_uuid))],
                             [op_put(keys.owner(vm_uuid), json.dumps({"host": host,
                                                                      "phase": "run"}))])
    if ok:
        kv.txn([], [op_put(keys.status(vm_uuid), json.dumps(
            {"phase": "running", "revision": revision, "reason": "", "retryable": False}))])


def retire_database(config: HostConfig, cluster: str) -> Path | None:
    """Rename the SQLite database once its definitions are in etcd: the host must not
    find them again after 'cluster leave' (the cluster may run them meanwhile)."""
    if not config.database.exists():
        return None
    target = config.database.with_name(f"{config.database.name}.moved-to-{cluster}-"
                                       f"{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("-wal", "-shm"):       # a clean close leaves none; keep them together
        side = config.database.with_name(config.database.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    os.replace(config.database, target)
    return target


def write_cluster_section(config: HostConfig, settings: ClusterSettings) -> None:
    """Append ``[cluster]`` to config.toml (atomically; refuses if one exists)."""
    path = config.config_file
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if _has_cluster_section(path):
        raise AlreadyExists(f"{path} already has a [cluster] section: run 'cluster leave' "
                            "first")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + settings.render(), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --- leave ----------------------------------------------------------------------------------
def leave(config: HostConfig) -> dict:
    """This host stops being a member. Its VMs stay in the cluster: their ownership is
    released (the manager places those meant to run on other hosts), the host's
    registration is deleted, ``[cluster]`` removed; the host is standalone and empty."""
    if config.cluster is None:
        raise NotFound("this host is not a cluster member (no [cluster] in config.toml)")
    settings = ClusterSettings.from_table(config.cluster, config.host_name)
    check_service_stopped(config)
    kv = EtcdKV(list(settings.endpoints), timeout_s=2.0, tls=tls_files(settings))
    check_reachable(kv, list(settings.endpoints))
    store, keys = EtcdStore(kv, settings.name), Keys(f"/parvisor/{settings.name}/")
    names = {r.uuid: r.name for r in store.list_vms()}
    running = sorted(names.get(u, u) for u in live_qemus(config))
    if running:
        raise InvalidInput(
            f"VMs still run on this host: {', '.join(running)}; shut them down or move "
            "them (vm migrate) first, else another host would start a second copy")
    member = kv.get(keys.member(settings.host))
    if member is not None:
        raise InvalidInput(f"{settings.host} still holds its cluster lease (a service "
                           "stopped less than a lease TTL ago?): retry in "
                           f"{settings.lease_ttl_s:g} s")
    released = release_ownership(kv, keys, settings.host, names)
    kv.txn([], [op_delete(keys.host(settings.host)), op_delete(keys.maintenance(settings.host))])
    remove_cluster_section(config)
    (config.state_dir / "cluster" / "lease").unlink(missing_ok=True)
    return {"left": settings.name, "host": settings.host, "released_vms": released}


def live_qemus(config: HostConfig) -> list[str]:
    """VM uuids with a live QEMU in this host's state dir (pidfile + command line)."""
    found = []
    for pidfile in (config.state_dir / "vms").glob("*/qemu.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if pid_alive(pid) and pidfile.parent.name.encode() in cmdline:
            found.append(pidfile.parent.name)
    return found


def release_ownership(kv: EtcdKV, keys: Keys, host: str, names: dict[str, str]) -> list[str]:
    """Delete the owner record of each VM this host owns, conditioned (like a failover)
    on the record being unchanged and the host holding no lease."""
    items, _ = kv.get_prefix(keys.under("owner"))
    released = []
    for item in items:
        if json.loads(item.value).get("host") != host:
            continue
        uuid = item.key.rsplit("/", 1)[1]
        ok, _, _ = kv.txn([cmp_mod(item.key, item.mod_revision),
                           cmp_absent(keys.member(host))],
                          [op_delete(item.key), op_delete(keys.status(uuid))])
        if ok:
            released.append(names.get(uuid, uuid))
    return sorted(released)


def remove_cluster_section(config: HostConfig) -> None:
    path = config.config_file
    text = path.read_text(encoding="utf-8")
    start = ("\n" + text).find("\n[cluster]")
    if start < 0:
        raise NotFound("this host is not a cluster member (no [cluster] in config.toml)")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text[:start], encoding="utf-8")
    os.replace(tmp, path)


# --- etcd members (witness, lab) ---------------------------------------------------------
def etcd_argv(name: str, ip: str, data_dir: Path, initial_cluster: str, state: str,
              server: certs.CertPair, ca: Path, token: str) -> list[str]:
    """One etcd 3.4 member with TLS and client-certificate auth for clients and peers.
    Heartbeat 100 ms / election 1000 ms: an election takes ~1 s, well under the lease
    slack (TTL − margin − interval), so a leader change never fences a host."""
    if not ip:
        raise InvalidInput("an etcd member needs an address to listen on")
    client, peer = f"https://{ip}:2379", f"https://{ip}:2380"
    tls = ["--cert-file", str(server.cert), "--key-file", str(server.key),
           "--client-cert-auth", "--trusted-ca-file", str(ca),
           "--peer-cert-file", str(server.cert), "--peer-key-file", str(server.key),
           "--peer-client-cert-auth", "--peer-trusted-ca-file", str(ca)]
    return [ETCD, "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", token, "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            # Pre-vote: a member cut off for a moment must not, on its return, force an
            # election with its inflated term (etcd 3.4 has it off by default); without it
            # every short blip costs a leader change and can run leases to their deadline.
            "--pre-vote=true",
            "--logger", "zap", "--log-level", "warn", *tls]
