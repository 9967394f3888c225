"""Deterministic failover-cluster simulator: virtual clock, fake etcd, fake hosts.

What for: runs the real ``Agent``/``Manager``/``decide`` code against a simulated world,
step by step, so scenario tests (tests/scenarios) reproduce host crashes, isolation,
frozen agents, etcd leader changes, quorum loss and site splits in milliseconds, with
a golden log. Invariants INV-1, -2, -3, -5, -6 are checked at every step (and INV-1
also at every VM start and every lease expiry), and GEN for replicated VMs (only the
newest generation's primary runs the VM; owner and primary agree) at every step and
start, so a golden can never bless a violation.

Never: threads, sleeps, wall-clock reads, randomness, unsorted iteration.

Model (deliberately simple, stated so it can be judged):
* network: nodes are hosts and etcd members; a link works when both ends are up, the
  pair is not cut and neither end is isolated;
* etcd: a leader needs direct links to a majority of members (itself included);
  elections take ``ELECTION_S``; a new leader refreshes every lease to a full TTL
  (etcd 3.4 behaviour); leases expire only while a leader exists; a host's request
  succeeds when it reaches a live member that reaches the leader;
* a host's VMs are fake processes; power loss removes them, its agent and watchdog;
* the watchdog is per host: fed by the agent, it kills the HA VMs it was told about
  once its deadline passes;
* replication (``replication/<uuid>`` records): each powered host with a running agent
  plays the replication engine of its role, as ``parvisor.replication.protocol.next_step``
  says: async cycles ship at each interval (the consistent point moves), a sync primary
  whose replica link is down for the stall limit commits ``broken`` (its consistent
  point is when the link went down), a copy or resync takes ``COPY_S``. Data itself is
  not modelled: the consistent point stands for it.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator
from unittest import mock

from parvisor.cluster.agent import Agent
from parvisor.cluster.decide import decide
from parvisor.cluster.env import (ClusterUnavailable, ClusterVm, HostRecord, Snapshot,
                                  VmStatus)
from parvisor.cluster.fencing import LocalVm
from parvisor.cluster.model import (ClusterPolicy, ClusterView, Decision, Owner,
                                    OwnerPhase, Priority, VmPhase)
from parvisor.replication.placement import ReplicaCandidate, choose_replica
from parvisor.replication.protocol import (LocalFacts, Mode, ReplicationRecord, State,
                                           Step, failover_verdict, format_point,
                                           next_step, parse_interval, request_force)

STEP_S = 0.25
ELECTION_S = 1.0
COPY_S = 2.0         # a simulated initial copy or resync


class InvariantViolation(AssertionError):
    pass


@contextlib.contextmanager
def no_wall_clock() -> Iterator[None]:
    """INV-6: any clock read inside the block fails the test."""
    def refuse(*_args: Any) -> float:
        raise InvariantViolation("INV-6: a decision read the clock")
    names = ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(time, name, refuse))
        yield


def guarded_decide(view: ClusterView) -> list[Decision]:
    with no_wall_clock():
        return decide(view)


# --- fake etcd ------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    site: str
    witness: bool = False
    alive: bool = True


@dataclass
class Lease:
    id: int
    ttl: float
    expires_at: float
    host: str


@dataclass
class Entry:
    value: Any
    mod_revision: int
    lease: int | None = None


class FakeEtcd:
    def __init__(self, sim: "Simulation", members: list[Member]) -> None:
        self.sim = sim
        self.members = {m.name: m for m in members}
        self.kv: dict[str, Entry] = {}
        self.revision = 1
        self.leases: dict[int, Lease] = {}
        self._lease_ids = itertools.count(1001)
        self.leader: str | None = None
        self.election_started: float | None = 0.0
        self._not_next: str | None = None

    # --- raft, coarsely -----------------------------------------------------------
    def _majority_ok(self, name: str) -> bool:
        peers = [m for m in self.members if m == name or self.sim.linked(name, m)]
        return len(peers) >= len(self.members) // 2 + 1

    def step(self, now: float) -> None:
        if self.leader is not None and not self._majority_ok(self.leader):
            self.sim.log(f"etcd: leader {self.leader} lost its majority")
            self._step_down(now)
        if self.leader is None:
            self._elect(now)
        if self.leader is not None:
            self._expire(now)

    def _step_down(self, now: float, *, avoid: bool = False) -> None:
        self._not_next = self.leader if avoid else None
        self.leader = None
        self.election_started = now

    def _elect(self, now: float) -> None:
        if self.election_started is None or now < self.election_started + ELECTION_S:
            return
        candidates = [m for m in sorted(self.members) if self.sim.node_up(m)
                      and self._majority_ok(m) and m != self._not_next]
        if not candidates:
            return
        self.leader, self._not_next, self.election_started = candidates[0], None, None
        for lease in self.leases.values():   # a new leader renews every lease
            lease.expires_at = now + lease.ttl
        self.sim.log(f"etcd: {self.leader} elected leader; leases renewed")

    def _expire(self, now: float) -> None:
        for lease in sorted(self.leases.values(), key=lambda l: l.id):
            if now >= lease.expires_at:
                self.sim.on_lease_expiry(lease)
                self._drop_lease(lease.id)
                self.sim.log(f"etcd: lease {lease.id} of {lease.host} expired")

    def _drop_lease(self, lease_id: int) -> None:
        self.leases.pop(lease_id, None)
        for key in sorted(k for k, e in self.kv.items() if e.lease == lease_id):
            del self.kv[key]
            self.revision += 1

    def available_from(self, node: str) -> bool:
        if self.leader is None or not self.sim.node_up(node):
            return False
        return any(self.sim.linked(node, m) and (m == self.leader
                                                 or self.sim.linked(m, self.leader))
                   for m in sorted(self.members))

    # --- kv -----------------------------------------------------------------------
    def mod_revision(self, key: str) -> int:
        entry = self.kv.get(key)
        return entry.mod_revision if entry else 0

    def put(self, key: str, value: Any, lease: int | None = None) -> int:
        self.revision += 1
        self.kv[key] = Entry(value, self.revision, lease)
        return self.revision

    def grant(self, host: str, ttl: float) -> int:
        lease = Lease(next(self._lease_ids), ttl, self.sim.now + ttl, host)
        self.leases[lease.id] = lease
        return lease.id

    def keepalive(self, lease_id: int) -> bool:
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        lease.expires_at = self.sim.now + lease.ttl
        return True


# --- hosts ----------------------------------------------------------------------------
@dataclass
class SimHost:
    record: HostRecord
    powered: bool = True
    agent_state: str = "running"          # running | frozen | dead
    agent: Agent | None = None
    running: set[str] = field(default_factory=set)
    watchdog: tuple[float, tuple[str, ...]] | None = None
    saved_lease: int | None = None
    isolated: bool = False

    @property
    def name(self) -> str:
        return self.record.name


class SimHostEnv:
    """``ClusterEnv`` for one simulated host."""

    def __init__(self, sim: "Simulation", host: str) -> None:
        self.sim = sim
        self.host = host

    @property
    def _me(self) -> SimHost:
        return self.sim.hosts[self.host]

    @property
    def _etcd(self) -> FakeEtcd:
        if not self.sim.etcd.available_from(self.host):
            raise ClusterUnavailable("etcd unreachable or without quorum", host=self.host)
        return self.sim.etcd

    def now(self) -> float:
        return self.sim.now

    def log(self, message: str) -> None:
        self.sim.log(message)

    def read(self) -> Snapshot:
        return self.sim.snapshot(self._etcd)

    def lease_grant(self, ttl_s: float) -> int:
        return self._etcd.grant(self.host, ttl_s)

    def lease_keepalive(self, lease_id: int) -> bool:
        return self._etcd.keepalive(lease_id)

    def lease_revoke(self, lease_id: int) -> None:
        self._etcd._drop_lease(lease_id)

    def register(self, lease_id: int, record: HostRecord) -> None:
        etcd = self._etcd
        etcd.put(f"hosts/{self.host}", record)
        etcd.put(f"members/{self.host}", record, lease=lease_id)

    def campaign(self, lease_id: int) -> bool:
        etcd = self._etcd
        entry = etcd.kv.get("manager")
        if entry is None:
            etcd.put("manager", self.host, lease=lease_id)
            return True
        return entry.value == self.host

    def change_owner(self, vm_uuid: str, expected_revision: int, host: str,
                     phase: OwnerPhase, require_absent: str | None) -> int | None:
        etcd = self._etcd
        if etcd.mod_revision(f"owner/{vm_uuid}") != expected_revision:
            return None
        if require_absent and f"members/{require_absent}" in etcd.kv:
            return None
        return etcd.put(f"owner/{vm_uuid}", (host, phase))

    def fail_over_to_replica(self, vm_uuid: str, expected_revision: int,
                             replication_revision: int, host: str,
                             record: ReplicationRecord, require_absent: str) -> int | None:
        etcd = self._etcd     # one txn: all compares hold, then both puts
        if (etcd.mod_revision(f"owner/{vm_uuid}") != expected_revision
                or etcd.mod_revision(f"replication/{vm_uuid}") != replication_revision
                or f"members/{require_absent}" in etcd.kv):
            return None
        etcd.revision += 1
        for key, value in ((f"owner/{vm_uuid}", (host, OwnerPhase.RUN)),
                           (f"replication/{vm_uuid}", record)):
            etcd.kv[key] = Entry(value, etcd.revision)
        return etcd.revision

    def write_replication(self, vm_uuid: str, expected_revision: int,
                          record: ReplicationRecord) -> bool:
        etcd = self._etcd
        if etcd.mod_revision(f"replication/{vm_uuid}") != expected_revision:
            return False
        etcd.put(f"replication/{vm_uuid}", record)
        return True

    def write_status(self, vm_uuid: str, status: VmStatus) -> bool:
        etcd = self._etcd
        if etcd.mod_revision(f"owner/{vm_uuid}") != status.revision:
            return False
        etcd.put(f"status/{vm_uuid}", status)
        return True

    def local_vms(self) -> list[LocalVm]:
        return [LocalVm(uuid, self.sim.vms[uuid].ha) for uuid in sorted(self._me.running)]

    def start_vm(self, vm: ClusterVm) -> None:
        self.sim.start_process(self.host, vm.uuid)

    def stop_vm(self, vm_uuid: str) -> None:
        self._me.running.discard(vm_uuid)

    def kill_vm(self, vm_uuid: str) -> None:
        self._me.running.discard(vm_uuid)

    def feed_watchdog(self, deadline: float, vm_uuids: list[str]) -> None:
        self._me.watchdog = (deadline, tuple(vm_uuids))

    def save_lease(self, lease_id: int | None) -> None:
        self._me.saved_lease = lease_id

    def load_lease(self) -> int | None:
        return self._me.saved_lease


# --- the world ------------------------------------------------------------------------
@dataclass(frozen=True)
class ScriptEvent:
    at: float
    verb: str
    args: tuple[str, ...]


class Simulation:
    def __init__(self, policy: ClusterPolicy, hosts: list[HostRecord],
                 members: list[Member], vms: list[ClusterVm],
                 placement: dict[str, str | None],
                 replications: list[ReplicationRecord] | None = None) -> None:
        self.now = 0.0
        self.policy = policy
        self.lines: list[str] = []
        self.hosts = {h.name: SimHost(h) for h in hosts}
        self.etcd = FakeEtcd(self, members)
        self.vms = {vm.uuid: vm for vm in vms}
        self.cuts: set[frozenset[str]] = set()
        self.starts: dict[str, int] = {uuid: 0 for uuid in self.vms}
        self.fenced_by: set[str] = set()        # hosts whose agent/watchdog killed VMs
        self.checker = InvariantChecker(self)
        self._later: list[ScriptEvent] = []
        self._seed(placement)
        self.engines = ReplicationEngines(self)
        for record in replications or []:
            self.etcd.put(f"replication/{record.vm_uuid}", record)

    # --- setup ----------------------------------------------------------------------
    def _seed(self, placement: dict[str, str | None]) -> None:
        self.etcd.leader, self.etcd.election_started = sorted(self.etcd.members)[0], None
        for uuid in sorted(self.vms):
            self.etcd.put(f"vm/{uuid}", self.vms[uuid])
            host = placement.get(uuid)
            if host is not None:
                revision = self.etcd.put(f"owner/{uuid}", (host, OwnerPhase.RUN))
                self.etcd.put(f"status/{uuid}", VmStatus(VmPhase.RUNNING, revision))
                self.hosts[host].running.add(uuid)
        for name in sorted(self.hosts):
            self._new_agent(name)
            self.hosts[name].agent.keepalive()      # type: ignore[union-attr]

    def _new_agent(self, name: str) -> None:
        host = self.hosts[name]
        host.agent = Agent(SimHostEnv(self, name), host.record, self.policy,
                           decide_fn=guarded_decide)
        host.agent_state = "running"

    # --- network --------------------------------------------------------------------
    def node_up(self, node: str) -> bool:
        if node in self.hosts:
            return self.hosts[node].powered
        return self.etcd.members[node].alive

    def site_of(self, node: str) -> str:
        if node in self.hosts:
            return self.hosts[node].record.site
        return self.etcd.members[node].site

    def linked(self, a: str, b: str) -> bool:
        if not (self.node_up(a) and self.node_up(b)):
            return False
        if any(n in self.hosts and self.hosts[n].isolated for n in (a, b)):
            return False
        return frozenset((a, b)) not in self.cuts

    def nodes(self) -> list[str]:
        return sorted(self.hosts) + sorted(self.etcd.members)

    # --- truth ----------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.lines.append(f"t={self.now:7.2f} {message}")

    def start_process(self, host: str, uuid: str) -> None:
        others = [h for h in sorted(self.hosts) if uuid in self.hosts[h].running]
        if others:
            raise InvariantViolation(f"INV-1 at t={self.now:.2f}: {self.vms[uuid].name} "
                                     f"started on {host} while running on {others}")
        self.checker.generation([host], uuid)
        self.hosts[host].running.add(uuid)
        self.starts[uuid] += 1

    def on_lease_expiry(self, lease: Lease) -> None:
        host = self.hosts[lease.host]
        alive_ha = sorted(self.vms[u].name for u in host.running if self.vms[u].ha)
        if alive_ha:
            raise InvariantViolation(f"INV-1 at t={self.now:.2f}: lease of {host.name} "
                                     f"expired while its HA VMs {alive_ha} still run")

    def snapshot(self, etcd: FakeEtcd) -> Snapshot:
        kv = etcd.kv
        def under(prefix: str) -> list[str]:
            return sorted(k[len(prefix):] for k in kv if k.startswith(prefix))
        owners = {u: Owner(kv[f"owner/{u}"].value[0], kv[f"owner/{u}"].value[1],
                           kv[f"owner/{u}"].mod_revision) for u in under("owner/")}
        manager = kv["manager"].value if "manager" in kv else None
        return Snapshot(
            revision=etcd.revision,
            hosts={h: kv[f"hosts/{h}"].value for h in under("hosts/")},
            members=frozenset(under("members/")),
            maintenance=frozenset(under("maint/")),
            vms={u: kv[f"vm/{u}"].value for u in under("vm/")},
            owners=owners, statuses={u: kv[f"status/{u}"].value for u in under("status/")},
            manager=manager, replications=self.replications(etcd))

    def replications(self, etcd: FakeEtcd) -> dict[str, ReplicationRecord]:
        prefix = "replication/"
        return {k[len(prefix):]: replace(e.value, revision=e.mod_revision)
                for k, e in sorted(etcd.kv.items()) if k.startswith(prefix)}

    def where(self, uuid: str) -> list[str]:
        return [h for h in sorted(self.hosts) if uuid in self.hosts[h].running]

    # --- time -----------------------------------------------------------------------
    def run(self, script: list[ScriptEvent], until: float) -> None:
        self._later = list(script)
        while self.now < until - 1e-9:
            self.now = round(self.now + STEP_S, 6)
            due = sorted((e for e in self._later if e.at <= self.now + 1e-9),
                         key=lambda e: e.at)
            self._later = [e for e in self._later if e.at > self.now + 1e-9]
            for event in due:
                self.apply(event)
            self.step()
        self.checker.final()

    def step(self) -> None:
        self.etcd.step(self.now)
        for name in sorted(self.hosts):
            host = self.hosts[name]
            if host.powered and host.agent_state == "running" and host.agent:
                host.agent.tick()
                if host.agent.fenced and host.agent.fenced_vms:
                    self.fenced_by.add(name)
        self.engines.step()
        self._watchdogs()
        self.checker.step()

    def _watchdogs(self) -> None:
        for name in sorted(self.hosts):
            host = self.hosts[name]
            if not host.powered or host.watchdog is None:
                continue
            deadline, uuids = host.watchdog
            if self.now < deadline:
                continue
            host.watchdog = None
            victims = sorted(u for u in uuids if u in host.running)
            host.running -= set(victims)
            if victims:
                self.fenced_by.add(name)
                names = ", ".join(self.vms[u].name for u in victims)
                self.log(f"{name} watchdog: not fed by {deadline:.2f}: killed {names}")

    def apply(self, event: ScriptEvent) -> None:
        self.log(f"event: {event.verb} {' '.join(event.args)}".rstrip())
        handler = getattr(self, "_ev_" + event.verb.replace("-", "_"), None)
        if handler is None:
            raise ValueError(f"unknown scenario event {event.verb!r}")
        handler(*event.args)

    # --- scripted faults (one method per verb of events.txt) -------------------------
    def _ev_fail(self, host: str) -> None:
        """Power loss: VMs, agent and watchdog die; the saved lease id survives."""
        h = self.hosts[host]
        h.powered, h.agent, h.agent_state, h.watchdog = False, None, "dead", None
        h.running.clear()

    def _ev_recover(self, host: str) -> None:
        self.hosts[host].powered = True
        self._new_agent(host)

    def _ev_isolate(self, host: str) -> None:
        self.hosts[host].isolated = True

    def _ev_heal(self, host: str) -> None:
        self.hosts[host].isolated = False

    def _ev_blip(self, host: str, seconds: str) -> None:
        self.hosts[host].isolated = True
        self._later.append(ScriptEvent(self.now + float(seconds), "heal", (host,)))

    def _ev_freeze(self, host: str) -> None:
        self.hosts[host].agent_state = "frozen"      # SIGSTOP: state kept, no ticks

    def _ev_thaw(self, host: str) -> None:
        self.hosts[host].agent_state = "running"

    def _ev_crash_agent(self, host: str) -> None:
        h = self.hosts[host]
        h.agent, h.agent_state = None, "dead"        # QEMUs and watchdog live on

    def _ev_restart_agent(self, host: str) -> None:
        self._new_agent(host)

    def _ev_crash_vm(self, vm_name: str) -> None:
        uuid = self._uuid(vm_name)
        for host in self.where(uuid):
            self.hosts[host].running.discard(uuid)

    def _ev_leader_change(self) -> None:
        self.log(f"etcd: leader {self.etcd.leader} steps down")
        self.etcd._step_down(self.now, avoid=True)

    def _ev_kill_etcd(self, member: str) -> None:
        self.etcd.members[member].alive = False

    def _ev_start_etcd(self, member: str) -> None:
        self.etcd.members[member].alive = True

    def _ev_witness_loss(self) -> None:
        for member in sorted(m for m, v in self.etcd.members.items() if v.witness):
            self.etcd.members[member].alive = False

    def _ev_site_split(self, sides: str, witness_side: str = "") -> None:
        """``site-split a|b witness=a``: cut site a from site b, and the witness from b."""
        left, right = sides.split("|")
        cut = [(left, right)]
        keep = witness_side.removeprefix("witness=")
        witness_sites = sorted({m.site for m in self.etcd.members.values() if m.witness})
        cut += [(w, right if keep == left else left) for w in witness_sites if keep]
        for site_a, site_b in cut:
            self.cuts |= {frozenset((a, b)) for a in self.nodes() for b in self.nodes()
                          if self.site_of(a) == site_a and self.site_of(b) == site_b}

    def _ev_heal_split(self) -> None:
        self.cuts.clear()

    def _ev_cut(self, a: str, b: str) -> None:
        """Cut one link (e.g. the replication link between two hosts)."""
        self.cuts.add(frozenset((a, b)))

    def _ev_uncut(self, a: str, b: str) -> None:
        self.cuts.discard(frozenset((a, b)))

    def _ev_force_failover(self, vm_name: str) -> None:
        """The user's ``replication failover NAME --force``, recorded in etcd."""
        uuid = self._uuid(vm_name)
        entry = self.etcd.kv[f"replication/{uuid}"]
        record = request_force(replace(entry.value, revision=entry.mod_revision))
        self.etcd.put(f"replication/{uuid}", record)
        self.log(f"user: force failover of {vm_name} recorded "
                 f"({failover_verdict(record).reason})")

    def _ev_drain(self, host: str) -> None:
        self.etcd.put(f"maint/{host}", True)

    def _ev_resume(self, host: str) -> None:
        self.etcd.kv.pop(f"maint/{host}", None)
        self.etcd.revision += 1

    def _uuid(self, vm_name: str) -> str:
        return next(u for u, vm in sorted(self.vms.items()) if vm.name == vm_name)


# --- invariants -----------------------------------------------------------------------
class InvariantChecker:
    """INV-1/2/3 and GEN at every step; INV-5 once faults healed (the script's end)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.down_for: dict[str, float] = {}

    @property
    def recovery_target_s(self) -> float:
        # worst case: the manager's own host failed too: its lease expires, a new
        # manager sees the host gone, waits the grace, places, the target host starts.
        p = self.sim.policy
        return 2 * p.lease_ttl_s + p.recovery_grace_s + 2 * p.keepalive_interval_s + 1.0

    def step(self) -> None:
        sim = self.sim
        for uuid in sorted(sim.vms):
            hosts = sim.where(uuid)
            if len(hosts) > 1:
                raise InvariantViolation(f"INV-1 at t={sim.now:.2f}: "
                                         f"{sim.vms[uuid].name} runs on {hosts}")
            if f"vm/{uuid}" not in sim.etcd.kv:
                raise InvariantViolation(f"INV-3: VM {sim.vms[uuid].name} was lost")
            self._inv2(uuid, hosts)
            self.generation(hosts, uuid)

    def generation(self, hosts: list[str], uuid: str) -> None:
        """GEN: only the newest generation's primary runs a replicated VM, and the
        owner record and the replica set's primary never disagree (one txn moves both)."""
        sim = self.sim
        entry = sim.etcd.kv.get(f"replication/{uuid}")
        if entry is None or entry.value.state == State.DISABLED:
            return
        record, name = entry.value, sim.vms[uuid].name
        stale = [h for h in hosts if h != record.primary]
        if stale:
            raise InvariantViolation(f"GEN at t={sim.now:.2f}: {name} runs on {stale}, "
                                     f"generation {record.generation} belongs to "
                                     f"{record.primary}")
        owner = sim.etcd.kv.get(f"owner/{uuid}")
        if owner is not None and owner.value[0] != record.primary:
            raise InvariantViolation(f"GEN at t={sim.now:.2f}: {name} owned by "
                                     f"{owner.value[0]}, primary is {record.primary}")

    def _inv2(self, uuid: str, hosts: list[str]) -> None:
        sim = self.sim
        vm = sim.etcd.kv[f"vm/{uuid}"].value
        status = sim.etcd.kv.get(f"status/{uuid}")
        in_error = status is not None and status.value.phase == VmPhase.ERROR \
            and bool(status.value.reason)
        if not vm.desired_running or hosts or in_error:
            self.down_for.pop(uuid, None)
            return
        if sim.etcd.leader is None:
            return      # without quorum nothing may be recovered; the clock stops
        down = self.down_for.get(uuid, 0.0) + STEP_S
        self.down_for[uuid] = down
        if down > self.recovery_target_s:
            raise InvariantViolation(
                f"INV-2 at t={sim.now:.2f}: {vm.name} down {down:.2f} s without a "
                f"reason (target {self.recovery_target_s:.2f} s)")

    def final(self) -> None:
        """INV-5: ownership records and processes agree once every fault healed."""
        sim = self.sim
        for uuid in sorted(sim.vms):
            owner = sim.etcd.kv.get(f"owner/{uuid}")
            owner_host = owner.value[0] if owner else None
            hosts = sim.where(uuid)
            if any(h != owner_host for h in hosts):
                raise InvariantViolation(f"INV-5: {sim.vms[uuid].name} runs on {hosts}, "
                                         f"owner is {owner_host}")
            vm = sim.etcd.kv[f"vm/{uuid}"].value
            status = sim.etcd.kv.get(f"status/{uuid}")
            in_error = status is not None and status.value.phase == VmPhase.ERROR
            if vm.desired_running and not in_error and owner_host and not hosts:
                raise InvariantViolation(f"INV-5: {vm.name} is owned by {owner_host} "
                                         "but runs nowhere")


# --- scenario files -------------------------------------------------------------------
MIB = 1 << 20


def parse_events(text: str) -> tuple[list[ScriptEvent], float]:
    """``t=12.5 verb arg...`` per line, ``#`` comments; ``t=N end`` ends the run."""
    events: list[ScriptEvent] = []
    until = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        stamp, verb, *args = line.split()
        if not stamp.startswith("t="):
            raise ValueError(f"events line {number}: expected t=SECONDS, got {stamp!r}")
        at = float(stamp[2:])
        if verb == "end":
            until = at
        else:
            events.append(ScriptEvent(at, verb, tuple(args)))
    if until is None:
        raise ValueError("events: a final 't=N end' line is required")
    return events, until


def build_simulation(initial: dict[str, Any]) -> Simulation:
    policy = ClusterPolicy(**initial.get("policy", {}))
    hosts = [HostRecord(h["name"], h.get("memory_mib", 4096) * MIB, h.get("cpus", 4),
                        h.get("shared_storage", True), h.get("site", ""),
                        replica_free_bytes=(h["replica_free_gib"] << 30
                                            if "replica_free_gib" in h else None))
             for h in initial["hosts"]]
    members = [Member(m["name"], m.get("site", ""), m.get("witness", False))
               for m in initial["etcd"]]
    vms, placement = [], {}
    for v in initial["vms"]:
        uuid = f"{v['name']}-uuid"
        vms.append(ClusterVm(
            uuid=uuid, name=v["name"], memory_bytes=v.get("memory_mib", 512) * MIB,
            vcpus=v.get("vcpus", 1), desired_running=v.get("desired", "running") == "running",
            ha=v.get("ha", True), priority=Priority(v.get("priority", "medium")),
            anti_affinity=v.get("anti_affinity"),
            preferred_hosts=tuple(v.get("preferred_hosts", ())),
            on_shared_storage=v.get("shared_storage", True)))
        placement[uuid] = v.get("host")
    replications = [_replication(v, hosts) for v in initial["vms"] if "replication" in v]
    return Simulation(policy, hosts, members, vms, placement, replications)


def _replication(v: dict[str, Any], hosts: list[HostRecord]) -> ReplicationRecord:
    """``"replication": {"mode": "sync", "replica": "h2", "state": "in-sync",
    "interval": "30s", "disk_gib": 1}``; without ``replica`` it is chosen as
    ``replication enable`` would (another site first)."""
    spec, disk = v["replication"], v["replication"].get("disk_gib", 1) << 30
    replica = spec.get("replica") or choose_replica(
        v["host"], disk, [ReplicaCandidate(h.name, site=h.site,
                                           free_bytes=h.replica_free_bytes)
                          for h in hosts]).host
    mode = Mode(spec.get("mode", "sync"))
    state = State(spec.get("state", "in-sync"))
    return ReplicationRecord(
        f"{v['name']}-uuid", v["name"], mode, v["host"], replica, state=state,
        interval_s=parse_interval(spec.get("interval", "30s")) if mode == Mode.ASYNC else 0,
        disk_bytes=disk, last_consistent_at=0.0 if state == State.IN_SYNC else None,
        rpo_s=0.0 if state == State.IN_SYNC else None)


class ReplicationEngines:
    """Every host's replication engine, reduced to the state moves it writes."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.link_down_since: dict[tuple[str, str], float] = {}   # (uuid, host)
        self.copy_until: dict[tuple[str, str], float] = {}         # (uuid, host)
        self.last_attempt: dict[str, float] = {}                   # async cycles

    def step(self) -> None:
        sim = self.sim
        for name in sorted(sim.hosts):
            host = sim.hosts[name]
            if not (host.powered and host.agent_state == "running"
                    and sim.etcd.available_from(name)):
                continue     # no service, or it cannot write etcd: nothing moves
            for uuid, record in sorted(sim.replications(sim.etcd).items()):
                role = record.role_of(name)
                if role is not None:
                    self._act(name, uuid, record, role)

    def _facts(self, host: str, uuid: str, record: ReplicationRecord,
               role: str) -> LocalFacts:
        sim = self.sim
        peer = record.replica if role == "primary" else record.primary
        if sim.linked(host, peer):
            self.link_down_since.pop((uuid, host), None)
            down = 0.0
        else:
            down = sim.now - self.link_down_since.setdefault((uuid, host), sim.now)
            down = max(down, STEP_S / 2)      # down since this very step still counts
        last = self.last_attempt.get(uuid, record.last_consistent_at or 0.0)
        return LocalFacts(host, working=(uuid, host) in self.copy_until,
                          has_vm=uuid in sim.hosts[host].running,
                          peer_is_member=f"members/{peer}" in sim.etcd.kv,
                          peer_unreachable_s=down,
                          cycle_due=(record.mode == Mode.ASYNC
                                     and sim.now - last >= record.interval_s - 1e-9))

    def _act(self, host: str, uuid: str, record: ReplicationRecord, role: str) -> None:
        sim, name = self.sim, record.vm_name
        facts = self._facts(host, uuid, record, role)
        if facts.working and sim.now >= self.copy_until[(uuid, host)] - 1e-9:
            del self.copy_until[(uuid, host)]
            if role != "primary" or record.state not in (State.INITIAL_SYNC,
                                                         State.RESYNCING):
                return      # the record moved on meanwhile (e.g. broken): copy dropped
            self._write(record.to(State.IN_SYNC, last_consistent_at=sim.now, rpo_s=0.0,
                                  bytes_behind=0, full_resync=False),
                        f"{host} replication: {name} copy to {record.replica} done; in-sync")
            return
        step = next_step(record, facts)
        if step == Step.PREPARE_TARGET:
            self._write(record.to(State.INITIAL_SYNC),
                        f"{host} replication: {name} target ready")
        elif step in (Step.START_COPY, Step.START_RESYNC):
            self.copy_until[(uuid, host)] = sim.now + COPY_S
            was_broken = record.state == State.BROKEN
            if was_broken:
                record = record.to(State.RESYNCING)
            # incremental only after a break (the primary's bitmaps); a re-protection
            # copies every block again, also into an old primary's stale images
            how = "incremental" if was_broken and not record.full_resync else "full"
            self._write(record, f"{host} replication: {name} {how} copy to "
                                f"{record.replica} started")
        elif step == Step.SHIP_CHANGES:
            self.last_attempt[uuid] = sim.now
            shipped = dict(last_consistent_at=sim.now, rpo_s=0.0, bytes_behind=0)
            self._write(record.to(State.IN_SYNC, **shipped) if record.state == State.LAGGING
                        else replace(record, **shipped),
                        f"{host} replication: {name} cycle shipped to {record.replica} "
                        f"(consistent point {format_point(sim.now)})")
        elif step == Step.MARK_LAGGING:
            self.last_attempt[uuid] = sim.now
            self._write(record.to(State.LAGGING, rpo_s=sim.now - (record.last_consistent_at or 0)),
                        f"{host} replication: {name} lagging ({record.replica} unreachable)")
        elif step == Step.MARK_BROKEN:
            since = self.link_down_since.get((uuid, host), sim.now)
            self._write(record.to(State.BROKEN, last_consistent_at=since,
                                  reason=f"replica {record.replica} unreachable"),
                        f"{host} replication: {name} broken ({record.replica} unreachable "
                        f"since {format_point(since)}); guest writes resume without it")
        elif step == Step.STOP_STALE_COPY:
            sim.hosts[host].running.discard(uuid)
            sim.log(f"{host} replication: stopped stale copy of {name}")
        elif step == Step.STOP_JOBS:
            self._write(replace(record, primary_stopped=True),
                        f"{host} replication: {name} jobs stopped")
        elif step == Step.DROP_REPLICA:
            self._write(record.to(State.DISABLED), f"{host} replication: {name} replica "
                                                   "deleted")
        elif step == Step.DELETE_RECORD:
            sim.etcd.kv.pop(f"replication/{uuid}", None)
            sim.etcd.revision += 1

    def _write(self, record: ReplicationRecord, message: str) -> None:
        self.sim.etcd.put(f"replication/{record.vm_uuid}", replace(record, revision=0))
        self.sim.log(message)
