"""Replication inside the host service: this host's side of every ``replication/<uuid>``
record (primary or replica), carried out with the engine (``engine.py``, ``target.py``).

What for: like live migration, the two hosts never call each other. Each service polls
the records (``POLL_S``), asks ``protocol.next_step`` what its side must do, runs that
as a task on the service's event loop, and writes the outcome into the record
(revision-checked); the other side reads it there. A restarted service resolves from
the record alone (its in-memory jobs are gone: the primary re-copies in full).

Who writes what: the replica writes ``initial-sync`` (its exports are ready), its
``exports``, ``images[replica]``, async ``cycle_open`` / ``cycle_committed`` /
``last_consistent_at``, and ``disabled``; the primary writes every other state move and
the progress figures; the cluster manager writes ``failed-over`` and the reversal.

Order that keeps "no acknowledged write lost" (sync): the engine holds a stalled guest
write until ``before_release`` has committed ``broken``; if that commit fails (etcd
unreachable, or the record moved on: a failover happened) the writes stay stalled and
the host's fencing ends the VM.

Never: run a QEMU of a VM whose record names another primary; let a replica target hold
images while this host starts the VM from them (``before_start``); write without the
record's revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import cmp_mod, op_delete, op_put
from parvisor.errors import ParvisorError, Refused, StateError
from parvisor.replication import engine
from parvisor.replication.paths import replica_image_path
from parvisor.replication.protocol import (LocalFacts, Mode, ReplicationRecord, State,
                                           Step, next_step)
from parvisor.replication.target import (EXPORT_ID, ReplicaTarget, TargetSpec,
                                         create_replica_image, daemon_of)
from parvisor.vm.argv import disk_node_names

log = logging.getLogger("parvisor.replication")
POLL_S = 0.25
PROGRESS_WRITE_S = 1.0
RETRY_S = 3.0                   # after a failed attempt to reach the replica
PORTS = range(10800, 11000)     # the replica's NBD exports (one per disk)
PLANNED_SYNC_TIMEOUT_S = 300.0
BEFORE_START_WAIT_S = 120.0     # a replica's step (e.g. committing a cycle) may finish


def write_durably(path: Path, text: str) -> None:
    """``text`` in ``path``, on disk when this returns (file and directory synced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ReplicationRefused(Refused):
    code = "replication_refused"
    http_status = 409


@dataclass
class PrimarySide:
    """This host runs the VM: its replication jobs (one per disk)."""

    generation: int
    sync: dict[str, engine.SyncReplication] = field(default_factory=dict)
    next_cycle_at: float = 0.0           # async: monotonic time of the next ship
    confirmed: int = 0                   # async: last cycle whose bitmaps were dropped
    last_progress: float = 0.0
    last_in_sync_wall: float | None = None


@dataclass
class ReplicaSide:
    """This host holds the replica: one qemu-storage-daemon per disk."""

    generation: int
    targets: dict[str, ReplicaTarget] = field(default_factory=dict)
    open_cycle: int = 0                  # async: the cycle whose overlays are exported


class ReplicationCoordinator:
    def __init__(self, vms: Any, host: str, *, address: str, root: Path,
                 tls_dir: Path | None) -> None:
        self.vms = vms                       # ClusterVmManager
        self.kv = vms.store.kv
        self.keys = vms.store.keys
        self.host = host
        self.address = address               # where this host's exports listen
        self.root = Path(root)               # this host's replica storage
        self.tls_dir = tls_dir
        # the daemons' QMP sockets: the service's run dir (short paths), if it has one
        config = getattr(vms, "config", None)
        self.socket_dir = config.state_dir / "run" if config is not None else None
        self.primary: dict[str, PrimarySide] = {}
        self.replica: dict[str, ReplicaSide] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.retry_at: dict[str, float] = {}
        self.planned: set[str] = set()       # a planned failover owns these VMs now
        self._stopping = False

    # --- records ------------------------------------------------------------------------
    def read(self, vm_uuid: str) -> ReplicationRecord | None:
        item = self.kv.get(self.keys.replication(vm_uuid))
        return ReplicationRecord.from_json(item.value, item.mod_revision) if item else None

    def _records(self) -> tuple[list[ReplicationRecord], set[str]]:
        items, _ = self.kv.get_prefix(self.keys.under("replication"))
        if not items:
            return [], set()      # the common case: one small read per poll
        members, _ = self.kv.get_prefix(self.keys.under("members"))
        records = [ReplicationRecord.from_json(i.value, i.mod_revision) for i in items]
        return records, {m.key.rsplit("/", 1)[-1] for m in members}

    async def write(self, record: ReplicationRecord, state: State | None = None,
                    **changes: Any) -> ReplicationRecord | None:
        """``record`` moved to ``state`` (guarded) with ``changes``, if the key still has
        its revision; the stored record, or None when somebody wrote first."""
        new = record.to(state, **changes) if state is not None and state != record.state \
            else replace(record, **changes)
        key = self.keys.replication(record.vm_uuid)
        try:
            ok, revision, _ = await asyncio.to_thread(
                self.kv.txn, [cmp_mod(key, record.revision)], [op_put(key, new.to_json())])
        except ClusterUnavailable:
            return None
        if not ok:
            return None
        if state is not None and state != record.state:
            log.info("replication of %s: %s -> %s%s", record.vm_name, record.state.value,
                     state.value, f" ({changes['reason']})" if changes.get("reason") else "")
        return replace(new, revision=revision)

    # --- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        leftovers_checked = False
        while not self._stopping:
            try:
                records, members = await asyncio.to_thread(self._records)
            except ClusterUnavailable:
                await asyncio.sleep(1.0)
                continue
            if not leftovers_checked:     # daemons of an earlier service: keep ours
                await asyncio.to_thread(self._stop_leftover_daemons, {
                    r.vm_uuid for r in records if r.replica == self.host})
                leftovers_checked = True
            for record in records:
                self._consider(record, members)
            await self._forget_gone({r.vm_uuid for r in records})
            await asyncio.sleep(POLL_S)

    def _consider(self, record: ReplicationRecord, members: set[str]) -> None:
        uuid = record.vm_uuid
        task = self.tasks.get(uuid)
        if task is not None and not task.done():
            return
        if uuid in self.planned or time.monotonic() < self.retry_at.get(uuid, 0.0):
            return
        step = self._step(record, members)
        if step is None:
            return
        self.tasks[uuid] = asyncio.ensure_future(self._run_step(step, record, members))

    def _step(self, record: ReplicationRecord, members: set[str]):
        """The coroutine function for this host's part now, or None."""
        role = record.role_of(self.host)
        if role != "replica" and record.vm_uuid in self.replica:
            return self._release_replica_role      # failed over to us, or moved away
        if role != "primary" and record.vm_uuid in self.primary:
            return self._release_primary_role
        if role == "primary":
            return self._primary        # every state of both modes: see _primary
        facts = LocalFacts(self.host, has_vm=self._process(record.vm_uuid) is not None,
                           peer_is_member=record.primary in members)
        step = next_step(record, facts)
        return {Step.PREPARE_TARGET: self._serve, Step.SERVE_TARGET: self._serve,
                Step.DROP_REPLICA: self._drop_replica}.get(step)

    async def _run_step(self, step, record: ReplicationRecord, members: set[str]) -> None:
        try:
            await step(record, members)
        except asyncio.CancelledError:
            raise
        except (ParvisorError, OSError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            log.warning("replication of %s on %s: %s", record.vm_name, self.host, message)
            self.retry_at[record.vm_uuid] = time.monotonic() + RETRY_S
        except Exception:     # noqa: BLE001 - one record's bug must not stop the loop
            log.exception("replication of %s: step failed", record.vm_name)
            self.retry_at[record.vm_uuid] = time.monotonic() + RETRY_S

    async def _forget_gone(self, present: set[str]) -> None:
        for uuid in [u for u in self.replica if u not in present]:
            await self._stop_targets(uuid)
        for uuid in [u for u in self.primary if u not in present]:
            await self._stop_jobs(uuid)

    # --- local facts --------------------------------------------------------------------
    def _process(self, vm_uuid: str):
        runtime = self.vms.runtimes.get(vm_uuid)
        process = runtime.process if runtime is not None else None
        return process if process is not None and not process.exited else None

    def _disk_nodes(self, record: ReplicationRecord) -> dict[str, str]:
        """disk id -> the format node of the primary's QEMU."""
        definition = self.vms.store.get_vm_by_uuid(record.vm_uuid).definition
        wanted = set(record.images.get(record.primary, {}))
        return {d.id: disk_node_names(d)[1] for d in definition.disks if d.id in wanted}

    # === primary ========================================================================
    async def _primary(self, record: ReplicationRecord, members: set[str]) -> None:
        if record.state == State.DISABLING:
            if not record.primary_stopped:
                await self._stop_jobs(record.vm_uuid)
                await self.write(record, primary_stopped=True)
        elif record.state == State.DISABLED:
            await self._delete_record(record)
        elif record.mode == Mode.ASYNC:
            await self._primary_async(record, members)
        else:
            await self._primary_sync(record, members)

    # --- synchronous --------------------------------------------------------------------
    async def _primary_sync(self, record: ReplicationRecord, members: set[str]) -> None:
        uuid, state = record.vm_uuid, record.state
        side = self.primary.get(uuid)
        process = self._process(uuid)
        if process is None:
            if side is not None:        # the VM stopped or crashed: the jobs end with it
                await self._vm_gone(record, side)
            return
        if side is not None and side.generation != record.generation:
            await self._stop_jobs(uuid)
            side = None
        if state in (State.ENABLING, State.FAILED_OVER):
            return                      # the replica's turn / the manager's
        if side is None:
            await self._start_sync_copy(record, process)
            return
        await self._follow_sync(record, side)

    async def _start_sync_copy(self, record: ReplicationRecord, process) -> None:
        """No jobs here: a first copy, a resync after a failover, or a restarted service
        / restarted VM (the copy is redone in full: what the replica missed is unknown)."""
        uuid = record.vm_uuid
        if record.state == State.IN_SYNC:
            if await self._adopt_mirrors(record, process):
                return
            # the replica held everything up to when the last jobs ended
            await self.write(record, State.BROKEN, reason="replication jobs restarted "
                             "(VM restart): full resync")
            return
        if not self._exports_ready(record) or not await self._reachable(record):
            return
        if record.state == State.BROKEN:
            record = await self.write(record, State.RESYNCING, last_consistent_at=None,
                                      bytes_done=0, reason="")
            if record is None:
                return
        side = PrimarySide(record.generation)
        self.primary[uuid] = side
        for disk, node in sorted(self._disk_nodes(record).items()):
            await engine.stop_sync_leftovers(process, node)
            side.sync[disk] = await engine.start_sync(
                process, node, record.exports[disk], export="disk", tls_dir=self.tls_dir,
                stall_limit_s=record.stall_limit_s,
                before_release=self._release_hook(uuid))
        log.info("replication of %s: copying %d disk(s) to %s", record.vm_name,
                 len(side.sync), record.replica)

    async def _adopt_mirrors(self, record: ReplicationRecord, process) -> bool:
        """This service restarted while the VM ran on: take over each disk's mirror
        if it is still in sync (no copy, the record stays in-sync); all or none."""
        if not self._exports_ready(record):
            return False
        side = PrimarySide(record.generation)
        for disk, node in sorted(self._disk_nodes(record).items()):
            rep = await engine.adopt_sync(
                process, node, record.exports[disk], export="disk", tls_dir=self.tls_dir,
                stall_limit_s=record.stall_limit_s,
                before_release=self._release_hook(record.vm_uuid))
            if rep is None:
                for adopted in side.sync.values():
                    await adopted.stop()
                return False
            side.sync[disk] = rep
        side.last_in_sync_wall = time.time()
        self.primary[record.vm_uuid] = side
        log.info("replication of %s: took over %d running mirror(s) to %s, still in sync",
                 record.vm_name, len(side.sync), record.replica)
        return True

    async def _reachable(self, record: ReplicationRecord) -> bool:
        """Every export accepts a TCP connection now (else: try again in RETRY_S)."""
        for uri in record.exports.values():
            host, port = engine.parse_nbd_uri(uri)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            except (OSError, asyncio.TimeoutError):
                self.retry_at[record.vm_uuid] = time.monotonic() + RETRY_S
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return True

    def _exports_ready(self, record: ReplicationRecord) -> bool:
        wanted = set(record.images.get(record.primary, {}))
        return bool(wanted) and wanted <= set(record.exports)

    async def _follow_sync(self, record: ReplicationRecord, side: PrimarySide) -> None:
        progress = {d: await rep.status() for d, rep in side.sync.items()}
        states = {p.state for p in progress.values()}
        if "broken" in states:
            await self._sync_broken(record, side, progress)
            return
        done = sum(p.bytes_done for p in progress.values())
        total = sum(p.bytes_total for p in progress.values()) or record.disk_bytes
        if states == {"in-sync"}:
            side.last_in_sync_wall = time.time()
            if record.state in (State.INITIAL_SYNC, State.RESYNCING):
                await self.write(record, State.IN_SYNC, bytes_done=total, bytes_behind=0,
                                 last_consistent_at=time.time(), full_resync=False,
                                 rpo_s=0.0, reason="")
            return
        if record.state == State.IN_SYNC:
            return          # a resync of one disk runs inside the engine
        now = time.monotonic()
        if now - side.last_progress >= PROGRESS_WRITE_S and done != record.bytes_done:
            side.last_progress = now
            await self.write(record, bytes_done=done, bytes_behind=max(0, total - done))

    async def _sync_broken(self, record: ReplicationRecord, side: PrimarySide,
                           progress: dict[str, engine.ReplicationProgress]) -> None:
        """A disk's mirror ended (the replica stalled, failed or went away)."""
        points = [p.last_consistent_at for p in progress.values()]
        point = (None if any(p is None for p in points)
                 else min(p.wall for p in points))  # type: ignore[union-attr]
        reason = next((p.error for p in progress.values() if p.error), "mirror ended")
        if record.state != State.BROKEN:
            if record.state not in (State.IN_SYNC, State.INITIAL_SYNC, State.RESYNCING):
                return
            record = await self.write(record, State.BROKEN, last_consistent_at=point,
                                      reason=reason, bytes_behind=record.disk_bytes)
            if record is None:
                return
        if not self._exports_ready(record) or not await self._reachable(record):
            return
        # the replica answers again: resync, incremental where the engine still has its
        # bitmaps (from here until in-sync the replica holds blocks of different times)
        record = await self.write(record, State.RESYNCING, last_consistent_at=None,
                                  bytes_done=0, reason="")
        if record is None:
            return
        for disk, rep in sorted(side.sync.items()):
            if rep.state == "broken":
                kind = await rep.resync(record.exports[disk])
                log.info("replication of %s: %s resync of %s started", record.vm_name,
                         kind, disk)

    def _release_hook(self, vm_uuid: str):
        async def before_release(reason: str) -> bool:
            """Commit ``broken`` before the stalled guest writes go on without the
            replica; False keeps them stalled (asked again at the next poll)."""
            try:
                record = await asyncio.to_thread(self.read, vm_uuid)
            except ClusterUnavailable:
                return False
            if record is None or record.primary != self.host:
                return False     # a failover happened: this copy must never go on
            if record.state in (State.BROKEN, State.DISABLING, State.DISABLED):
                return True
            point = None
            if record.state == State.IN_SYNC:
                side = self.primary.get(vm_uuid)
                stalled = time.time() - (side.last_in_sync_wall if side and
                                         side.last_in_sync_wall else time.time())
                point = time.time() - max(stalled, record.stall_limit_s)
            try:
                written = await self.write(record, State.BROKEN, last_consistent_at=point,
                                           reason=reason, bytes_behind=record.disk_bytes)
            except StateError:
                return False
            return written is not None
        return before_release

    async def _vm_gone(self, record: ReplicationRecord, side: PrimarySide) -> None:
        """QEMU exited (shutdown or crash). With write-blocking every acknowledged write
        was on the replica: an in-sync record stays in sync (consistent as of now)."""
        self.primary.pop(record.vm_uuid, None)
        for rep in side.sync.values():
            with contextlib.suppress(Exception):
                await rep.stop()
        if record.state == State.IN_SYNC and record.mode == Mode.SYNC:
            await self.write(record, last_consistent_at=time.time())

    # --- asynchronous -------------------------------------------------------------------
    async def _primary_async(self, record: ReplicationRecord, members: set[str]) -> None:
        uuid, state = record.vm_uuid, record.state
        process = self._process(uuid)
        side = self.primary.get(uuid)
        if side is not None and side.generation != record.generation:
            self.primary.pop(uuid, None)
            side = None
        if process is None or state in (State.ENABLING, State.FAILED_OVER):
            return
        if side is None:
            side = self.primary[uuid] = PrimarySide(record.generation)
            if record.state in (State.INITIAL_SYNC, State.RESYNCING) or record.full_resync:
                for node in self._disk_nodes(record).values():
                    await engine.stop_async(process, node)    # the first cycle ships all
            side.confirmed = record.cycle_committed
        await self._async_cycle(record, side, process)

    async def _async_cycle(self, record: ReplicationRecord, side: PrimarySide,
                           process) -> None:
        now = time.monotonic()
        if record.cycle_committed > side.confirmed and \
                record.cycle_committed == record.cycle_shipped:
            await self._confirm_cycle(record, side, process)
            return
        shippable = (record.cycle_open > record.cycle_shipped and self._exports_ready(record))
        due = now >= side.next_cycle_at
        if not due:
            return
        if not shippable:
            if record.state == State.IN_SYNC and record.last_consistent_at is not None and \
                    time.time() - record.last_consistent_at > 2 * record.interval_s:
                await self.write(record, State.LAGGING, reason="the replica has not opened "
                                 "a cycle", rpo_s=time.time() - record.last_consistent_at)
            return
        side.next_cycle_at = now + record.interval_s
        started = time.time()
        try:
            reports = [await engine.run_async_cycle(
                process, node, record.exports[disk], spool_dir=self._spool_dir(record),
                export="disk", tls_dir=self.tls_dir, stall_limit_s=record.stall_limit_s)
                for disk, node in sorted(self._disk_nodes(record).items())]
        except ParvisorError as exc:
            side.next_cycle_at = now + min(record.interval_s, RETRY_S * 2)
            if record.state == State.IN_SYNC:
                await self.write(record, State.LAGGING, reason=exc.message,
                                 rpo_s=(time.time() - record.last_consistent_at
                                        if record.last_consistent_at else None))
            raise
        point = min((r.consistent_at.wall for r in reports), default=started)
        shipped = sum(r.bytes_shipped for r in reports)
        await self.write(record, cycle_shipped=record.cycle_open, shipped_at=point,
                         bytes_done=record.bytes_done + shipped)

    async def _confirm_cycle(self, record: ReplicationRecord, side: PrimarySide,
                             process) -> None:
        for node in self._disk_nodes(record).values():
            await engine.confirm_async_cycle(process, node)
        side.confirmed = record.cycle_committed
        rpo = time.time() - (record.last_consistent_at or time.time())
        state = State.IN_SYNC if record.state != State.IN_SYNC else None
        if record.state == State.BROKEN:
            state = None
        await self.write(record, state, rpo_s=rpo, bytes_behind=0, full_resync=False,
                         reason="" if state else record.reason)

    def _spool_dir(self, record: ReplicationRecord) -> Path:
        path = self.root / record.vm_uuid / "spool"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- primary: ending ----------------------------------------------------------------
    async def _stop_jobs(self, vm_uuid: str) -> None:
        side = self.primary.pop(vm_uuid, None)
        for rep in (side.sync.values() if side else ()):
            with contextlib.suppress(Exception):
                await rep.stop()
        process = self._process(vm_uuid)
        record = await asyncio.to_thread(self.read, vm_uuid)
        if process is not None and record is not None and record.mode == Mode.ASYNC:
            for node in self._disk_nodes(record).values():
                with contextlib.suppress(Exception):
                    await engine.stop_async(process, node)

    async def _release_primary_role(self, record: ReplicationRecord, _members) -> None:
        await self._stop_jobs(record.vm_uuid)

    async def _delete_record(self, record: ReplicationRecord) -> None:
        key = self.keys.replication(record.vm_uuid)
        await asyncio.to_thread(self.kv.txn, [cmp_mod(key, record.revision)],
                                [op_delete(key)])
        log.info("replication of %s disabled", record.vm_name)

    # === replica =========================================================================
    async def _serve(self, record: ReplicationRecord, _members) -> None:
        """Keep one export per disk open; async: open, and commit, cycles."""
        uuid = record.vm_uuid
        side = self.replica.get(uuid)
        if side is not None and (side.generation != record.generation
                                 or any(t.exited for t in side.targets.values())):
            await self._stop_targets(uuid)
            side = None
        if side is None:
            side = await self._start_targets(record)
            record = await self._publish_exports(record, side)
            if record is None:
                return
        if record.mode == Mode.ASYNC:
            await self._replica_cycle(record, side)

    def _image_paths(self, record: ReplicationRecord) -> dict[str, Path]:
        mine = record.images.get(self.host, {})
        return {disk: Path(mine[disk]) if disk in mine
                else replica_image_path(self.root, record.vm_uuid, disk)
                for disk in record.images.get(record.primary, {})}

    def _commit_marker(self, vm_uuid: str) -> Path:
        return self.root / vm_uuid / "committing.json"

    async def _replay_interrupted_commit(self, record: ReplicationRecord) -> None:
        """An async commit this host did not finish (power loss): fold each disk's
        overlay left on disk in again, with a short-lived daemon per disk; a disk
        without an overlay had finished (the overlay goes only after the flush)."""
        marker = self._commit_marker(record.vm_uuid)
        if not marker.exists():
            return
        cycle = json.loads(marker.read_text()).get("cycle")
        for disk, path in sorted(self._image_paths(record).items()):
            spec = TargetSpec(image=path, format="qcow2", listen_host=self.address,
                              port=await asyncio.to_thread(self._free_port),
                              state_dir=self.root / record.vm_uuid / f"qsd-{disk}",
                              export_name="disk", tls_dir=self.tls_dir,
                              socket_dir=self.socket_dir)
            if not (Path(spec.state_dir) / "cycle.qcow2").exists() or not path.exists():
                continue
            # a daemon of an earlier service may still hold the image (and the cut
            # commit's job): it goes first, the overlay file stays
            await self._stop_targets_in(spec.state_dir)
            target = await ReplicaTarget.start(spec)
            try:
                await target.replay_commit()
            finally:
                await target.stop()
            log.warning("replication of %s: commit of cycle %s into %s finished after an "
                        "interruption", record.vm_name, cycle, path)
        marker.unlink()

    async def _start_targets(self, record: ReplicationRecord) -> ReplicaSide:
        fresh = record.state in (State.ENABLING, State.INITIAL_SYNC) or record.full_resync
        if not fresh:
            await self._replay_interrupted_commit(record)
        side = ReplicaSide(record.generation)
        paths = self._image_paths(record)
        try:
            for disk, path in sorted(paths.items()):
                state_dir = self.root / record.vm_uuid / f"qsd-{disk}"
                adopted = None if fresh else await self._adopt_target(state_dir, path,
                                                                      record.mode)
                if adopted is not None:
                    side.targets[disk] = adopted
                    continue
                await self._stop_targets_in(state_dir)
                size = record.disk_sizes.get(disk)
                if fresh or not path.exists():
                    if not size:
                        raise ReplicationRefused(f"replication of {record.vm_name}: the "
                                                 f"size of disk {disk} is not recorded")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.unlink(missing_ok=True)
                    await asyncio.to_thread(create_replica_image, path, "qcow2", size)
                spec = TargetSpec(image=path, format="qcow2", listen_host=self.address,
                                  port=await asyncio.to_thread(self._free_port),
                                  state_dir=state_dir,
                                  export_name="disk", tls_dir=self.tls_dir,
                              socket_dir=self.socket_dir)
                side.targets[disk] = await ReplicaTarget.start(spec)
                if record.mode == Mode.SYNC:
                    await side.targets[disk].export_live()
        except BaseException:
            for target in side.targets.values():
                await target.stop()
            raise
        self.replica[record.vm_uuid] = side
        return side

    async def _publish_exports(self, record: ReplicationRecord,
                               side: ReplicaSide) -> ReplicationRecord | None:
        exports = {disk: t.nbd_uri for disk, t in side.targets.items()}
        images = {**record.images, self.host: {d: str(t.spec.image)
                                               for d, t in side.targets.items()}}
        changes: dict[str, Any] = {"exports": exports, "images": images}
        if record.mode == Mode.ASYNC:
            changes["cycle_open"] = 0     # no overlay open: a new cycle is opened next
        state = State.INITIAL_SYNC if record.state == State.ENABLING else None
        written = await self.write(record, state, **changes)
        if written is None:
            await self._stop_targets(record.vm_uuid)   # try again from the new record
        return written

    async def _replica_cycle(self, record: ReplicationRecord, side: ReplicaSide) -> None:
        if side.open_cycle and record.cycle_shipped == side.open_cycle:
            # a complete cycle: marked durably first, so a power loss during the commit
            # is finished at the next start instead of leaving a torn image
            marker = self._commit_marker(record.vm_uuid)
            await asyncio.to_thread(write_durably, marker, json.dumps(
                {"cycle": side.open_cycle, "shipped_at": record.shipped_at,
                 "generation": record.generation}))
            for target in side.targets.values():
                await target.commit_cycle()
            await asyncio.to_thread(marker.unlink)
            committed = side.open_cycle
            side.open_cycle = 0
            record = await self.write(record, cycle_committed=committed,
                                      last_consistent_at=record.shipped_at)
            if record is None:
                return
        if side.open_cycle == 0:
            number = max(record.cycle_open, record.cycle_shipped, record.cycle_committed) + 1
            uris = {disk: await target.begin_cycle() for disk, target in side.targets.items()}
            side.open_cycle = number
            if await self.write(record, cycle_open=number, exports=uris) is None:
                side.open_cycle = 0
                for target in side.targets.values():
                    await target.abort_cycle()

    async def _drop_replica(self, record: ReplicationRecord, _members) -> None:
        await self._stop_targets(record.vm_uuid)
        for path in self._image_paths(record).values():
            path.unlink(missing_ok=True)
        shutil.rmtree(self.root / record.vm_uuid, ignore_errors=True)
        images = {h: p for h, p in record.images.items() if h != self.host}
        await self.write(record, State.DISABLED, images=images, exports={})

    async def _release_replica_role(self, record: ReplicationRecord, _members) -> None:
        await self._stop_targets(record.vm_uuid)

    async def _stop_targets(self, vm_uuid: str) -> None:
        side = self.replica.pop(vm_uuid, None)
        targets = list(side.targets.values()) if side else []
        for state_dir in sorted((self.root / vm_uuid).glob("qsd-*")):
            if not any(Path(t.spec.state_dir) == state_dir for t in targets):
                adopted = await ReplicaTarget.adopt(state_dir)   # an earlier service's
                targets += [adopted] if adopted is not None else []
        for target in targets:
            with contextlib.suppress(Exception):
                await target.abort_cycle()   # async: the image stays the last full cycle
            await target.stop()

    async def _stop_targets_in(self, state_dir: Path) -> None:
        """A daemon an earlier service left in ``state_dir`` (holding its image)."""
        leftover = await ReplicaTarget.adopt(state_dir)
        if leftover is not None:
            await leftover.stop()

    async def _adopt_target(self, state_dir: Path, image: Path,
                            mode: Mode) -> ReplicaTarget | None:
        """The daemon an earlier service of this host left serving ``image``: kept
        (its export and the primary's connection untouched; an open async cycle is
        dropped, the primary ships it again); one serving something else is stopped."""
        target = await ReplicaTarget.adopt(state_dir)
        if target is None:
            return None
        if Path(target.spec.image) != image or target.spec.listen_host != self.address:
            await target.stop()
            return None
        if mode == Mode.ASYNC:
            await target.abort_cycle()
        elif not any(e.get("id") == EXPORT_ID for e in await target.execute(
                "query-block-exports")):
            await target.export_live()
        return target

    def _free_port(self) -> int:
        used = {t.spec.port for s in self.replica.values() for t in s.targets.values()}
        for port in PORTS:
            if port in used:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind((self.address, port))
                except OSError:
                    continue
            return port
        raise ReplicationRefused(f"no free port for a replica export in {PORTS.start}-"
                                 f"{PORTS.stop - 1} on {self.address}")

    def detach(self) -> None:
        """Service stop: the replica daemons run on (like the VMs' QEMUs), so the
        primaries' mirrors never notice; the next service of this host adopts them."""
        self._stopping = True

    def _stop_leftover_daemons(self, keep: set[str]) -> None:
        """Daemons of an earlier service for VMs this host no longer holds a replica
        of (``keep``: those it does; adopted when served again): stopped by the PID each
        recorded, after checking it is that daemon."""
        for pidfile in self.root.glob("*/qsd-*/qsd.pid"):
            if pidfile.parent.parent.name in keep:
                continue
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if daemon_of(pid, pidfile):
                log.warning("replication: stopping leftover qemu-storage-daemon %d", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # === called by the VM manager and the API ===========================================
    async def before_start(self, vm_uuid: str) -> None:
        """This host is about to start the VM (it became the primary by a failover):
        its replica targets must let go of the images first."""
        task = self.tasks.get(vm_uuid)
        if task is not None and not task.done():
            # an async commit of a complete cycle must finish: cut short, it would
            # leave the image half old, half new (a torn disk)
            done, _ = await asyncio.wait({task}, timeout=BEFORE_START_WAIT_S)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._stop_targets(vm_uuid)
        record = await asyncio.to_thread(self.read, vm_uuid)
        if record is not None:
            await self._replay_interrupted_commit(record)

    async def planned_failover(self, name: str) -> dict[str, Any]:
        """Reverse the direction with nothing lost: pause the guest, let the replica
        catch up (sync: the mirror is in sync; async: one last cycle, committed), then
        one txn moves owner, diskhost and the record (new generation, the old primary
        its replica, to be resynced); the paused QEMU here quits."""
        vm = self.vms.store.get_vm(name)
        record = await asyncio.to_thread(self.read, vm.uuid)
        self._check_planned(name, record)
        process = self._process(vm.uuid)
        if process is None:
            raise StateError(f"planned failover of {name}: it is not running on "
                             f"{self.host}", "off", ["running"], vm=name)
        self.planned.add(vm.uuid)
        try:
            task = self.tasks.get(vm.uuid)
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            await process.pause()
            paused_at = time.time()
            try:
                record = await self._catch_up(record, process, paused_at)
                await self._stop_jobs(vm.uuid)
                revision = await self._switch(record)
            except BaseException:
                with contextlib.suppress(Exception):
                    await process.resume()
                raise
            # the new primary owns it now: quit the paused copy, write no state
            await self.vms.drop_migrated_copy(vm.uuid)
        finally:
            self.planned.discard(vm.uuid)
        self.vms.event("replication", f"{name}: planned failover {record.primary} -> "
                       f"{record.replica}", vm)
        return {"vm": name, "from": record.primary, "to": record.replica,
                "generation": record.generation + 1, "owner_revision": revision,
                "note": f"{name} starts on {record.replica} from its replica; "
                        f"{record.primary} becomes the replica after a full resync"}

    def _check_planned(self, name: str, record: ReplicationRecord | None) -> None:
        if record is None:
            raise ReplicationRefused(f"{name} is not replicated")
        if record.primary != self.host:
            raise ReplicationRefused(f"planned failover of {name} runs on its primary "
                                     f"{record.primary}, not {self.host}")
        if record.state not in (State.IN_SYNC, State.LAGGING):
            raise StateError(f"planned failover of {name}: replication is "
                             f"{record.state.value}", record.state.value,
                             [State.IN_SYNC.value])

    async def _catch_up(self, record: ReplicationRecord, process,
                        paused_at: float) -> ReplicationRecord:
        """With the guest paused: wait until the replica holds every write."""
        deadline = time.monotonic() + PLANNED_SYNC_TIMEOUT_S
        side = self.primary.get(record.vm_uuid)
        while True:
            record = await asyncio.to_thread(self.read, record.vm_uuid)
            if record is None or record.primary != self.host:
                raise ReplicationRefused("the replication record changed during the "
                                         "planned failover")
            if record.mode == Mode.SYNC:
                states = ({(await r.status()).state for r in side.sync.values()}
                          if side else set())
                if states == {"in-sync"} and record.state == State.IN_SYNC:
                    return record
            else:
                if side is not None and record.cycle_committed == record.cycle_shipped \
                        and record.shipped_at is not None \
                        and record.shipped_at >= paused_at:
                    await self._confirm_cycle(record, side, process)
                    return await asyncio.to_thread(self.read, record.vm_uuid) or record
                if side is not None:
                    side.next_cycle_at = 0.0
                    await self._async_cycle(record, side, process)
            if time.monotonic() >= deadline:
                raise ReplicationRefused(f"the replica did not catch up within "
                                         f"{PLANNED_SYNC_TIMEOUT_S:.0f} s; nothing moved")
            await asyncio.sleep(POLL_S)

    async def _switch(self, record: ReplicationRecord) -> int:
        keys, uuid = self.keys, record.vm_uuid
        owner = await asyncio.to_thread(self.kv.get, keys.owner(uuid))
        if owner is None:
            raise ReplicationRefused(f"{record.vm_name} has no owner record")
        new = record.failed_over(f"planned failover from {record.primary}")
        new = new.reversed_to(record.primary, incremental=False)
        ok, revision, _ = await asyncio.to_thread(
            self.kv.txn,
            [cmp_mod(keys.owner(uuid), owner.mod_revision),
             cmp_mod(keys.replication(uuid), record.revision)],
            [op_put(keys.owner(uuid), json.dumps({"host": record.replica, "phase": "run"})),
             op_put(keys.replication(uuid), new.to_json()),
             op_put(keys.disk_host(uuid), record.replica)])
        if not ok:
            raise ReplicationRefused(f"{record.vm_name} changed during the planned "
                                     "failover; nothing moved")
        return revision

    # === test failover (parvisor.replication.test_failover) ===========================
    async def test_failover(self, name: str) -> dict[str, Any]:
        """``failover --test`` on this replica host: a throwaway copy boots isolated."""
        from parvisor.replication.test_failover import start_test_copy
        return await start_test_copy(self, name)

    async def stop_test_failover(self, name: str) -> dict[str, Any]:
        """``failover --test-stop``: the test VM, its copies and switch removed."""
        from parvisor.replication.test_failover import stop_test_copy
        return await stop_test_copy(self, name)
