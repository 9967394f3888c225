"""Where a VM's replica goes, and which enable/disable requests are refused. Pure.

What for: ``replication enable`` (any host, later the API) and the cluster manager's
re-protection after a failover both pick the replica host here, from facts passed in
(membership, site, free bytes of the host's replica storage as it published them).

Preference: a host in another site than the primary when sites are defined (a site
loss must leave a copy), else any other host; among those, the most free replica
storage, then the name (deterministic). Never the primary; never a host that did not
publish its free space or has less than the disks need; never a non-member or a host
in maintenance or quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass

from parvisor.errors import AlreadyExists, InvalidInput, NotFound, Refused
from parvisor.replication.protocol import (Mode, ReplicationRecord, State,
                                           DEFAULT_STALL_LIMIT_S, parse_interval)


@dataclass(frozen=True)
class ReplicaCandidate:
    name: str
    member: bool = True
    site: str = ""
    free_bytes: int | None = None      # free space of its replica storage; None: unknown
    maintenance: bool = False
    quarantined: bool = False


@dataclass(frozen=True)
class ReplicaChoice:
    host: str
    note: str = ""                     # e.g. why the replica is in the primary's site


class NoReplicaHost(Refused):
    """No host can hold the replica; ``details['refusals']`` says why per host."""

    code = "no_replica_host"
    http_status = 409


def refusal(candidate: ReplicaCandidate, primary: str, disk_bytes: int) -> str | None:
    """Why ``candidate`` cannot hold the replica, or None."""
    if candidate.name == primary:
        return "it is the primary (replica on the same host protects nothing)"
    if not candidate.member:
        return "not a member"
    if candidate.maintenance:
        return "in maintenance"
    if candidate.quarantined:
        return "quarantined"
    if candidate.free_bytes is None:
        return "has not published the free space of its replica storage"
    if candidate.free_bytes < disk_bytes:
        return (f"no room: needs {disk_bytes >> 20} MiB, has "
                f"{max(candidate.free_bytes, 0) >> 20} MiB free")
    return None


def choose_replica(primary: str, disk_bytes: int, hosts: list[ReplicaCandidate], *,
                   to: str | None = None) -> ReplicaChoice:
    """The replica host for a VM whose primary is ``primary``; ``to``: the user's pick
    (checked, never second-guessed). Raises a clear refusal otherwise."""
    by_name = {h.name: h for h in hosts}
    if to is not None:
        return _checked_pick(to, by_name, primary, disk_bytes)
    refusals = {h.name: refusal(h, primary, disk_bytes) for h in hosts}
    usable = sorted((h for h in hosts if refusals[h.name] is None),
                    key=lambda h: (-(h.free_bytes or 0), h.name))
    if not usable:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(refusals.items()))
        raise NoReplicaHost(f"no host can hold the replica ({reasons or 'no other host'})",
                            refusals={n: w for n, w in sorted(refusals.items()) if w})
    primary_site = by_name[primary].site if primary in by_name else ""
    if not primary_site:
        return ReplicaChoice(usable[0].name)
    remote = [h for h in usable if h.site and h.site != primary_site]
    if remote:
        return ReplicaChoice(remote[0].name)
    return ReplicaChoice(usable[0].name, f"no host of another site can hold it: the "
                                         f"replica stays in site {primary_site} (a site "
                                         "loss takes both copies)")


def _checked_pick(to: str, by_name: dict[str, ReplicaCandidate], primary: str,
                  disk_bytes: int) -> ReplicaChoice:
    if to == primary:
        raise InvalidInput(f"replica host {to} is the VM's own host: a replica there "
                           "protects nothing", host=to)
    if to not in by_name:
        raise NotFound(f"no cluster host named {to!r}", host=to)
    why = refusal(by_name[to], primary, disk_bytes)
    if why is not None:
        raise InvalidInput(f"replica host {to}: {why}", host=to)
    return ReplicaChoice(to)


def enable_request(vm_uuid: str, vm_name: str, primary: str, *, mode: str,
                   interval: str | None, disk_bytes: int, shared_disks: list[str],
                   existing: ReplicationRecord | None, hosts: list[ReplicaCandidate],
                   to: str | None = None) -> tuple[ReplicationRecord, str]:
    """The record ``replication enable`` writes (state enabling) and a note, or a
    refusal; nothing is written on refusal."""
    if existing is not None and existing.state != State.DISABLED:
        raise AlreadyExists(f"replication of {vm_name} is already enabled "
                            f"({existing.mode.value} to {existing.replica}, "
                            f"{existing.state.value})", vm=vm_name)
    if shared_disks:
        raise InvalidInput(f"{vm_name} has shared (guest-cluster) disks "
                           f"{', '.join(sorted(shared_disks))}: several VMs write them, "
                           "a per-VM replica cannot be consistent", vm=vm_name)
    try:
        chosen_mode = Mode(mode)
    except ValueError:
        raise InvalidInput(f"replication mode {mode!r} is not sync or async",
                           mode=mode) from None
    if chosen_mode == Mode.SYNC and interval is not None:
        raise InvalidInput("--interval is for async replication (sync ships every "
                           "write)", interval=interval)
    interval_s = parse_interval(interval or "5m") if chosen_mode == Mode.ASYNC else 0
    choice = choose_replica(primary, disk_bytes, hosts, to=to)
    record = ReplicationRecord(vm_uuid, vm_name, chosen_mode, primary, choice.host,
                               generation=(existing.generation + 1 if existing else 1),
                               state=State.ENABLING, interval_s=interval_s,
                               disk_bytes=disk_bytes, stall_limit_s=DEFAULT_STALL_LIMIT_S)
    return record, choice.note


def disable_request(record: ReplicationRecord) -> tuple[ReplicationRecord, str]:
    """``replication disable``: the next record and what happens. Defined in every
    state: during the initial sync the copy is cancelled and the partial replica
    deleted; the VM keeps running on its primary throughout. Twice: refused."""
    if record.state in (State.DISABLING, State.DISABLED):
        raise AlreadyExists(f"replication of {record.vm_name} is already being disabled",
                            vm=record.vm_name)
    if record.state in (State.ENABLING, State.INITIAL_SYNC):
        note = ("initial sync cancelled; the partial replica on "
                f"{record.replica} is deleted; {record.vm_name} keeps running")
    else:
        note = (f"replication stopped; the replica image on {record.replica} is deleted; "
                f"{record.vm_name} keeps running on {record.primary}, unprotected")
    return record.to(State.DISABLING, reason="disabled by the user"), note
