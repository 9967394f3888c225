"""``cluster status``: hosts with health and lease age, etcd quorum and voters, manager,
VMs per host. Read-only; one snapshot plus a few etcd maintenance calls.

What for: the API route ``GET /v1/cluster`` and the lab print this. Lease age is how
long ago the host's lease was last renewed (granted TTL minus what is left), which is
the number to watch against the TTL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_env import parse_snapshot
from parvisor.cluster.etcd_kv import EtcdKV
from parvisor.replication.protocol import ReplicationRecord, protection
from parvisor.store.etcd import Keys


def cluster_status(kv: EtcdKV, cluster: str, shared_storage: Path | None = None) -> dict[str, Any]:
    keys = Keys(f"/parvisor/{cluster}/")
    etcd = etcd_members(kv)
    try:
        items, revision = kv.get_prefix(keys.prefix)
    except ClusterUnavailable as exc:
        return {"cluster": cluster, "quorum": False, "etcd": etcd, "error": exc.message,
                "hosts": [], "vms": [], "manager": None}
    snap = parse_snapshot(keys, items, revision, shared_storage)
    leases = {item.key.rsplit("/", 1)[1]: item.lease for item in items
              if item.key.startswith(keys.under("members"))}
    hosts = [_host(kv, snap, name, leases.get(name)) for name in sorted(snap.hosts)]
    mark_witnesses(etcd, snap.hosts.values())
    vms = []
    for uuid in sorted(snap.vms, key=lambda u: snap.vms[u].name):
        vm, owner = snap.vms[uuid], snap.owners.get(uuid)
        status = snap.statuses.get(uuid)
        current = status if status and owner and status.revision == owner.revision else None
        vms.append({"name": vm.name, "uuid": uuid, "ha": vm.ha, "priority": vm.priority.value,
                    "host": owner.host if owner else None,
                    "desired": "running" if vm.desired_running else "off",
                    "phase": current.phase.value if current else "pending",
                    "reason": current.reason if current else "",
                    **_protection(vm, snap.replications.get(uuid))})
    return {"cluster": cluster, "quorum": True, "revision": revision, "etcd": etcd,
            "manager": snap.manager, "hosts": hosts, "vms": vms}


def _protection(vm: Any, record: ReplicationRecord | None) -> dict[str, Any]:
    """Whether a failover would happen now, and the wording ``vm show`` uses."""
    wording = protection(vm.ha, vm.on_shared_storage, record)
    return {"protected": wording.startswith("protected"), "protection": wording,
            "disk_host": vm.disk_host,
            "replication": record.public() if record is not None else None}


def _host(kv: EtcdKV, snap: Any, name: str, lease: int | None) -> dict[str, Any]:
    record = snap.hosts[name]
    age = ttl = None
    if lease:
        try:
            reply = kv.call("/kv/lease/timetolive", {"ID": lease})
            granted, left = int(reply.get("grantedTTL", 0)), int(reply.get("TTL", -1))
            if left >= 0:
                age, ttl = granted - left, granted
        except ClusterUnavailable:
            pass
    member = name in snap.members
    health = ("maintenance" if name in snap.maintenance else "up") if member else "down"
    return {"name": name, "member": member, "health": health, "site": record.site,
            "lease_age_s": age, "lease_ttl_s": ttl, "shared_storage": record.shared_storage,
            "memory_bytes": record.memory_bytes, "cpus": record.cpus,
            "manager": snap.manager == name}


def host_addresses(records: Iterable[Any]) -> set[str] | None:
    """The addresses the hosts are reached at (cluster API, migration), or None when a
    host published neither (then no member can be told apart from a host's)."""
    addresses = set()
    for record in records:
        found = {urlparse(record.api_url).hostname if record.api_url else None,
                 (record.migration or {}).get("migration_address") or None} - {None}
        if not found:
            return None
        addresses |= found
    return addresses


def mark_witnesses(members: list[dict[str, Any]], records: Iterable[Any]) -> None:
    """``witness`` on each etcd member: True for a member that runs on no host (a vote
    for quorum only, e.g. ``cluster witness serve`` at a third site), None if unknown.

    A member is a host's when it carries the host's name (the lab) or listens at one of
    the hosts' addresses (``cluster create`` names members m1, m2, …)."""
    records = list(records)
    names = {record.name for record in records}
    addresses = host_addresses(records)
    for member in members:
        at = {urlparse(url).hostname for url in member.get("client_urls", [])}
        if member["name"] in names or (addresses is not None and at & addresses):
            member["witness"] = False
        else:
            member["witness"] = None if addresses is None else True


def etcd_members(kv: EtcdKV) -> list[dict[str, Any]]:
    """Every etcd member: voter or learner, reachable or not, leader or not."""
    try:
        members = kv.call("/cluster/member/list", {}).get("members", [])
    except ClusterUnavailable:
        return []
    out = []
    for member in members:
        urls = member.get("clientURLs", [])
        entry = {"name": member.get("name", ""), "client_urls": urls,
                 "voter": not member.get("isLearner", False), "reachable": False,
                 "leader": False}
        if urls:
            try:
                status = EtcdKV([urls[0]], timeout_s=1.0, tls=kv.tls).status()
                entry["reachable"] = True
                entry["leader"] = status.get("leader") == status["header"].get("member_id")
            except ClusterUnavailable:
                pass
        out.append(entry)
    return out
