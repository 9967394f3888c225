"""Cluster administration done on one host's state dir: ``cluster create|join|leave``,
the etcd member command line (``cluster witness serve`` and the lab), and moving a
standalone host's VM definitions from SQLite into etcd.

What for: these run with the host service *stopped* (they change which store the
service opens); the service picks the cluster up at its next start. The PKI lives in
``<state>/cluster/pki``: ``ca.crt``/``ca.key`` (copy both to a joining host, over a
channel you trust, then delete ``ca.key`` where it is not needed), ``etcd-<name>``
server certificates, ``host-<name>`` client certificates.

Never: overwrite an existing CA (that would lock every member out); start a second
copy of a running VM while moving definitions (a running VM gets *this* host as its
owner in the same step, so the manager never places it elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from parvisor.cluster import certs
from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import EtcdKV, cmp_absent, op_put
from parvisor.cluster.settings import ClusterSettings
from parvisor.config import HostConfig
from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.model.states import ACTIVE_STATES
from parvisor.store.etcd import EtcdStore, Keys

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def pki_dir(config: HostConfig) -> Path:
    return config.state_dir / "cluster" / "pki"


def ensure_ca(directory: Path, cluster: str, *, create: bool) -> certs.CertPair:
    pair = certs.CertPair(directory / "ca.crt", directory / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        if create:
            raise AlreadyExists(f"{directory} already holds a cluster CA; refusing to "
                                "replace it (members trust it)")
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


def settings_for(config: HostConfig, name: str, endpoints: list[str], directory: Path,
                 **timings: object) -> ClusterSettings:
    ca = ensure_ca(directory, name, create=False)
    host = config.host_name
    client = certs.issue(ca, directory, f"host-{host}", server=False)
    settings = ClusterSettings(name=name, host=host, endpoints=tuple(endpoints),
                               ca=ca.cert, cert=client.cert, key=client.key,
                               **timings)   # type: ignore[arg-type]
    settings.check()
    return settings


def write_cluster_section(config: HostConfig, settings: ClusterSettings) -> None:
    """Append ``[cluster]`` to config.toml (atomically; refuses if one exists)."""
    path = config.config_file
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if "\n[cluster]" in "\n" + text:
        raise AlreadyExists(f"{path} already has a [cluster] section: run 'cluster leave' "
                            "first")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + settings.render(), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def remove_cluster_section(config: HostConfig) -> None:
    path = config.config_file
    text = path.read_text(encoding="utf-8")
    start = text.find("\n[cluster]")
    if start < 0:
        raise NotFound("this host is not a cluster member (no [cluster] in config.toml)")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text[:start + 1], encoding="utf-8")
    os.replace(tmp, path)


def move_definitions(config: HostConfig, settings: ClusterSettings, kv: EtcdKV) -> list[str]:
    """Copy every SQLite VM into etcd; a VM active here becomes owned by this host."""
    from parvisor.store.sqlite import SqliteStore
    if not config.database.exists():
        return []
    local = SqliteStore(config.database)
    store, keys = EtcdStore(kv, settings.name), Keys(f"/parvisor/{settings.name}/")
    moved = []
    try:
        for record in local.list_vms():
            store.create_vm(record.definition)
            store.set_state(record.uuid, record.state, record.state_reason,
                            desired_state=record.desired_state)
            if record.state in ACTIVE_STATES:
                _own_here(kv, keys, record.uuid, settings.host)
            moved.append(record.name)
    finally:
        local.close()
    return moved


def _own_here(kv: EtcdKV, keys: Keys, vm_uuid: str, host: str) -> None:
    ok, revision, _ = kv.txn([cmp_absent(keys.owner(vm_uuid))],
                             [op_put(keys.owner(vm_uuid), json.dumps({"host": host,
                                                                      "phase": "run"}))])
    if ok:
        kv.txn([], [op_put(keys.status(vm_uuid), json.dumps(
            {"phase": "running", "revision": revision, "reason": "", "retryable": False}))])


def check_reachable(kv: EtcdKV) -> None:
    try:
        kv.status()
    except ClusterUnavailable as exc:
        raise ClusterUnavailable(f"etcd is not reachable with these certificates: "
                                 f"{exc.message}") from exc


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
