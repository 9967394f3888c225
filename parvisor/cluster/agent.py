"""The host agent: lease keepalive, self-fencing, watchdog feeding, and running exactly
the VMs this host owns.

What for: one per host, ticked by a loop (the real service) or by the simulator. Each
tick: keep the lease alive (recording when the last successful keepalive was *sent*),
fence by the deadline when it could not, feed the watchdog, campaign for manager, and
reconcile local QEMUs against the owner records.

Never: start a VM without a live lease and a fresh owner record naming this host, or one
whose replication record names another host as its primary (a stale copy); kill a
VM because etcd is unreachable before the deadline (a blip must change nothing); write a
status without the owner revision it read (a woken frozen agent's writes are rejected).
"""

from __future__ import annotations

from parvisor.cluster.env import (ClusterEnv, ClusterUnavailable, ClusterVm, HostRecord,
                                  Snapshot, VmStatus)
from parvisor.cluster.fencing import (LocalVm, fence_deadline, must_fence, orphans,
                                      to_kill_at_deadline)
from parvisor.cluster.manager import DecideFn, Manager
from parvisor.cluster.model import ClusterPolicy, OwnerPhase, VmPhase
from parvisor.cluster.decide import decide
from parvisor.replication.protocol import may_run


class Agent:
    def __init__(self, env: ClusterEnv, record: HostRecord, policy: ClusterPolicy,
                 decide_fn: DecideFn = decide) -> None:
        self.env = env
        self.record = record
        self.policy = policy
        self.decide_fn = decide_fn
        self.lease_id: int | None = env.load_lease()
        self.last_ok_sent: float | None = None
        self.next_keepalive = float("-inf")
        self.registered = False               # this agent wrote its registration
        self.fenced = False
        self.fenced_vms: set[str] = set()     # killed by our own fence: restart once safe
        self.manager: Manager | None = None
        self._adopted: set[str] = set()
        self._names: dict[str, str] = {}      # uuid -> name, from the last snapshot (logs)
        self._not_primary: set[str] = set()   # start refused by replication (logged once)

    # --- one tick -------------------------------------------------------------------
    def tick(self) -> None:
        self.keepalive()
        self._fence_if_due()
        snapshot = self._read()
        if snapshot is None:
            return
        self._names = {uuid: vm.name for uuid, vm in snapshot.vms.items()}
        self._manage(snapshot)
        self._reconcile(snapshot)

    def keepalive(self) -> None:
        now = self.env.now()
        if now < self.next_keepalive:
            return
        self.next_keepalive = now + self.policy.keepalive_interval_s
        sent = now     # the deadline counts from the send, never from the reply
        try:
            if self.lease_id is not None and not self.env.lease_keepalive(self.lease_id):
                self.env.log(f"{self.record.name}: lease {self.lease_id} is gone")
                if not self.fenced:
                    self._fence("lease lost")
                self._set_lease(None)
            if self.lease_id is None:
                self._join()
            elif not self.registered:
                # a restarted service kept its lease: publish this start's registration
                # (e.g. the facts of an upgraded QEMU) under the same lease
                self.env.register(self.lease_id, self.record)
                self.registered = True
        except ClusterUnavailable:
            return
        self.last_ok_sent = sent
        if self.fenced and self.fenced_vms:
            self.env.log(f"{self.record.name}: keepalive ok again; fence lifted")
        self.fenced = False
        self._feed_watchdog()

    def _join(self) -> None:
        lease_id = self.env.lease_grant(self.policy.lease_ttl_s)
        self.env.register(lease_id, self.record)
        self.registered = True
        self._set_lease(lease_id)
        self.env.log(f"{self.record.name}: joined with lease {lease_id}")

    def _set_lease(self, lease_id: int | None) -> None:
        self.lease_id = lease_id
        self.env.save_lease(lease_id)

    def _feed_watchdog(self) -> None:
        if self.last_ok_sent is None:
            return
        deadline = fence_deadline(self.last_ok_sent, self.policy.lease_ttl_s,
                                  self.policy.fence_margin_s)
        ha = [vm.uuid for vm in to_kill_at_deadline(self.env.local_vms())]
        self.env.feed_watchdog(deadline, ha)

    def _fence_if_due(self) -> None:
        if self.fenced or not must_fence(self.env.now(), self.last_ok_sent,
                                         self.policy.lease_ttl_s, self.policy.fence_margin_s):
            return
        self._fence("no successful keepalive by the deadline")

    def _fence(self, why: str) -> None:
        self.fenced = True
        self.manager = None      # a fenced host must not manage either
        victims = to_kill_at_deadline(self.env.local_vms())
        for vm in victims:
            self.env.kill_vm(vm.uuid)
            self.fenced_vms.add(vm.uuid)
        if victims:
            names = ", ".join(self._name(vm.uuid) for vm in victims)
            self.env.log(f"{self.record.name}: self-fence ({why}): killed {names}")

    def _read(self) -> Snapshot | None:
        if self.fenced or self.lease_id is None:
            return None
        try:
            return self.env.read()
        except ClusterUnavailable:
            return None

    # --- manager role ---------------------------------------------------------------
    def _manage(self, snapshot: Snapshot) -> None:
        try:
            leader = self.lease_id is not None and self.env.campaign(self.lease_id)
        except ClusterUnavailable:
            return
        if not leader:
            self.manager = None
            return
        if self.manager is None:
            self.env.log(f"{self.record.name}: became cluster manager")
            self.manager = Manager(self.env, self.policy, self.decide_fn)
        self.manager.tick(snapshot)

    # --- local VMs against owner records --------------------------------------------
    def _reconcile(self, snapshot: Snapshot) -> None:
        if self.record.name not in snapshot.members:
            return      # our registration is not visible yet: start nothing
        local = {vm.uuid: vm for vm in self.env.local_vms()}
        self._kill_orphans(snapshot, local)
        for uuid in sorted(snapshot.vms):
            owner = snapshot.owners.get(uuid)
            if owner is None or owner.host != self.record.name:
                self.fenced_vms.discard(uuid)     # moved away: never ours to restart
                continue
            try:
                self._reconcile_vm(snapshot, uuid, uuid in local)
            except ClusterUnavailable:
                return

    def _kill_orphans(self, snapshot: Snapshot, local: dict[str, LocalVm]) -> None:
        marked = [LocalVm(vm.uuid, vm.ha, vm.pid,
                          snapshot.owners.get(vm.uuid) is not None
                          and snapshot.owners[vm.uuid].host == self.record.name,
                          vm.incoming)
                  for vm in local.values()]
        for vm in orphans(marked):
            self.env.kill_vm(vm.uuid)
            self.env.log(f"{self.record.name}: killed orphan {self._name(vm.uuid)} "
                         "(owned elsewhere)")
            del local[vm.uuid]

    def _reconcile_vm(self, snapshot: Snapshot, uuid: str, running: bool) -> None:
        try:
            self._reconcile_one(snapshot, uuid, running)
        finally:
            self._adopted.add(uuid)     # only a fresh agent's first look logs adoption

    def _reconcile_one(self, snapshot: Snapshot, uuid: str, running: bool) -> None:
        vm, owner = snapshot.vms[uuid], snapshot.owners[uuid]
        status = snapshot.statuses.get(uuid)
        current = status if status is not None and status.revision == owner.revision else None
        want = vm.desired_running and owner.phase == OwnerPhase.RUN
        if running and not want:
            self.env.stop_vm(uuid)
            self._status(uuid, VmStatus(VmPhase.STOPPED, owner.revision))
        elif running and (current is None or current.phase != VmPhase.RUNNING):
            self.env.log(f"{self.record.name}: adopted {vm.name} (r{owner.revision})")
            self._status(uuid, VmStatus(VmPhase.RUNNING, owner.revision))
        elif running and uuid not in self._adopted:
            self.env.log(f"{self.record.name}: adopted {vm.name} (r{owner.revision}, "
                         "already running)")
        elif not running and want and self._replica_allows(snapshot, vm):
            self._maybe_start(vm, current, owner.revision)
        elif not running and owner.phase == OwnerPhase.STOP and (
                current is None or current.phase != VmPhase.STOPPED):
            self._status(uuid, VmStatus(VmPhase.STOPPED, owner.revision))

    def _replica_allows(self, snapshot: Snapshot, vm: ClusterVm) -> bool:
        """Defence in depth (GEN): the failover txn moves owner and replication record
        together, so an owner naming us with a record naming another primary means
        something is wrong; its copy here is stale, never start it."""
        record = snapshot.replications.get(vm.uuid)
        if may_run(record, self.record.name):
            self._not_primary.discard(vm.uuid)
            return True
        if vm.uuid not in self._not_primary and record is not None:
            self._not_primary.add(vm.uuid)
            self.env.log(f"{self.record.name}: not starting {vm.name}: replication names "
                         f"{record.primary} its primary (generation {record.generation})")
        return False

    def _maybe_start(self, vm: ClusterVm, current: VmStatus | None, revision: int) -> None:
        if current is None or vm.uuid in self.fenced_vms:
            # a new placement, or a VM our own fence killed while the lease survived
            self.fenced_vms.discard(vm.uuid)
            self.env.start_vm(vm)
            self.env.log(f"{self.record.name}: started {vm.name} (r{revision})")
            self._status(vm.uuid, VmStatus(VmPhase.RUNNING, revision))
        elif current.phase == VmPhase.RUNNING:
            # it ran at this revision and its process is gone without our fence: crash
            self._status(vm.uuid, VmStatus(VmPhase.CRASHED, revision, "QEMU exited"))
            self.env.log(f"{self.record.name}: {vm.name} crashed (r{revision})")

    def _name(self, uuid: str) -> str:
        return self._names.get(uuid, uuid)

    def _status(self, uuid: str, status: VmStatus) -> None:
        if not self.env.write_status(uuid, status):
            self.env.log(f"{self.record.name}: status write for {self._name(uuid)} rejected "
                         f"(stale token r{status.revision})")
