"""The replication protocol between a VM's primary host and its replica host: the record
both sides share in etcd (``replication/<uuid>``), its states, who may move it where,
what a restarted agent must do, and when a failover to the replica is allowed. Pure: no
I/O, no clock (times are passed in; recorded times are wall clock, for humans only).

States (who writes each move):

    enabling        ─replica─▶  initial-sync  ─primary─▶  in-sync
    in-sync         ◀─primary─▶ lagging       (async: a cycle could not ship / shipped)
    any copying     ─primary─▶  broken        (the replica is away: see sync below)
    broken          ─primary─▶  resyncing     ─primary─▶  in-sync
    in-sync|lagging ─manager─▶  failed-over   (failover txn; from broken only forced)
    failed-over     ─manager─▶  resyncing     (the old primary, or a new host, as replica)
    any but disabled ─user─▶ disabling ─replica─▶ disabled (the primary deletes the key)

* ``generation`` numbers the replica set. Only ``primary`` of the newest generation may
  run the VM. A failover bumps it in the SAME etcd transaction that moves the owner
  record (compare owner revision, this record's revision, the old primary's membership
  key absent; put owner, put this record): either both change or neither.
* Sync mode: every guest write is on the replica before the guest sees it complete. If
  the replica stops answering, guest writes stall; the primary resumes them without the
  replica only AFTER it committed ``broken`` here (revision-checked). Unable to reach
  etcd, it keeps them stalled and self-fences by its deadline. Hence a record that the
  manager reads as ``in-sync`` means no acknowledged write is missing on the replica.
* Async mode: at each interval the changed blocks are shipped; ``last_consistent_at`` is
  the point the replica image can be brought back to; ``lagging`` when a cycle could not
  ship (the loss window grows, it is reported as ``rpo_s``).
* A replica image is usable for failover only with a completed copy: never during
  ``enabling``/``initial-sync``, never mid-``resyncing`` (blocks arrive out of order).

Never: run the VM on a host that is not the newest generation's primary; let the old
primary start its stale copy (it becomes the replica after a resync).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from parvisor.errors import InvalidInput, StateError

INTERVALS_S: dict[str, int] = {"30s": 30, "5m": 300, "15m": 900}
DEFAULT_STALL_LIMIT_S = 5.0       # sync: longest guest write stall before going broken


class InvalidTransition(StateError):
    """A replication state move that ``TRANSITIONS`` does not allow: a logic error or a
    stale request; nothing was changed."""


class Mode(str, enum.Enum):
    SYNC = "sync"
    ASYNC = "async"

    def __str__(self) -> str:
        return self.value


class State(str, enum.Enum):
    ENABLING = "enabling"           # record written; the replica host prepares its image
    INITIAL_SYNC = "initial-sync"   # the full copy runs (progress in bytes_done/total)
    IN_SYNC = "in-sync"
    LAGGING = "lagging"             # async: a cycle could not ship; the window grows
    BROKEN = "broken"               # the primary runs alone; failover would lose data
    RESYNCING = "resyncing"         # changed blocks (or all, full_resync) to the replica
    FAILED_OVER = "failed-over"     # the new primary runs alone until a replica resyncs
    DISABLING = "disabling"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.ENABLING: frozenset({S.INITIAL_SYNC, S.BROKEN, S.DISABLING}),
    S.INITIAL_SYNC: frozenset({S.IN_SYNC, S.BROKEN, S.DISABLING}),
    S.IN_SYNC: frozenset({S.LAGGING, S.BROKEN, S.FAILED_OVER, S.DISABLING}),
    S.LAGGING: frozenset({S.IN_SYNC, S.BROKEN, S.FAILED_OVER, S.DISABLING}),
    S.BROKEN: frozenset({S.RESYNCING, S.FAILED_OVER, S.DISABLING}),
    S.RESYNCING: frozenset({S.IN_SYNC, S.BROKEN, S.DISABLING}),
    S.FAILED_OVER: frozenset({S.RESYNCING, S.DISABLING}),
    S.DISABLING: frozenset({S.DISABLED}),
    S.DISABLED: frozenset(),
}
# the replica holds an image it can be started from (possibly behind: see failover_verdict)
COPY_USABLE = frozenset({S.IN_SYNC, S.LAGGING, S.BROKEN})
# the replica host is receiving writes or blocks: it serves its NBD export
RECEIVING = frozenset({S.INITIAL_SYNC, S.IN_SYNC, S.LAGGING, S.RESYNCING})


def parse_interval(text: str) -> int:
    """``30s`` / ``5m`` / ``15m`` -> seconds (Hyper-V Replica's three choices)."""
    try:
        return INTERVALS_S[text]
    except KeyError:
        raise InvalidInput(f"replication interval {text!r} is not one of "
                           f"{', '.join(INTERVALS_S)}", interval=text) from None


def format_point(at: float | None) -> str:
    """A recorded time for people. The simulator's clock starts at 0, the real one is
    the Unix epoch: show the first as ``t=…`` so scenario logs stay readable."""
    if at is None:
        return "never"
    if at < 1e8:
        return f"t={at:.2f}"
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ReplicationRecord:
    """``replication/<uuid>`` in etcd (JSON). ``revision`` is the key's mod revision (not
    stored in the value): every write compares it."""

    vm_uuid: str
    vm_name: str
    mode: Mode
    primary: str
    replica: str
    generation: int = 1
    state: State = State.ENABLING
    interval_s: int = 0                    # async: seconds between cycles; sync: 0
    disk_bytes: int = 0                    # virtual size of the replicated disks
    bytes_done: int = 0                    # initial sync / resync progress
    bytes_behind: int = 0                  # async: dirty since the last consistent point
    last_consistent_at: float | None = None    # wall clock; None: never a full copy
    rpo_s: float | None = None             # last reported recovery point age
    stall_limit_s: float = DEFAULT_STALL_LIMIT_S
    full_resync: bool = False              # resync target holds no usable base
    force_failover: bool = False           # the user accepted losing data (--force)
    export_uri: str | None = None          # the replica's NBD export (nbd:host:port:…)
    primary_stopped: bool = False          # disabling: the primary dropped its jobs
    reason: str = ""                       # why broken / failed over / disabled
    # host -> {disk id: image path}: each host's copy (the primary's are the paths it
    # runs the VM from; a replica writes its own when it creates them)
    images: dict[str, dict[str, str]] = field(default_factory=dict)
    disk_sizes: dict[str, int] = field(default_factory=dict)   # disk id -> virtual bytes
    # disk id -> the replica's NBD export of that disk (nbd://IP:PORT), this generation
    exports: dict[str, str] = field(default_factory=dict)
    # async cycles, a handshake through this record: the replica opens cycle n's
    # overlays (cycle_open = n, exports point at them), the primary ships into them
    # (cycle_shipped = n, shipped_at = the point in time shipped), the replica commits
    # them into its images (cycle_committed = n, last_consistent_at = shipped_at)
    cycle_open: int = 0
    cycle_shipped: int = 0
    cycle_committed: int = 0
    shipped_at: float | None = None
    # the last failover, kept through the re-protection that follows: what it said and
    # the consistent point it went back to (async: writes after it were lost)
    last_failover: str = ""
    failover_point: float | None = None
    revision: int = 0

    # --- (de)serialisation ----------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data.pop("revision")
        data["mode"] = self.mode.value
        data["state"] = self.state.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, revision: int) -> "ReplicationRecord":
        data = json.loads(raw)
        data["mode"] = Mode(data["mode"])
        data["state"] = State(data["state"])
        return cls(**data, revision=revision)

    def public(self) -> dict[str, Any]:
        """What ``replication status --json`` shows."""
        data = json.loads(self.to_json())
        data.update(revision=self.revision, rpo_s=self.rpo,
                    last_consistent_point=format_point(self.last_consistent_at),
                    failover=failover_verdict(self).reason)
        return data

    # --- facts ------------------------------------------------------------------------
    @property
    def rpo(self) -> float | None:
        """Seconds of writes a failover now would lose (0: none, None: unknown)."""
        if self.mode == Mode.SYNC and self.state == State.IN_SYNC:
            return 0.0
        return self.rpo_s

    def role_of(self, host: str) -> str | None:
        if host == self.primary:
            return "primary"
        if host == self.replica:
            return "replica"
        return None

    def to(self, state: State, **changes: Any) -> "ReplicationRecord":
        """The next record; a move not in ``TRANSITIONS`` raises InvalidTransition."""
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"move replication of {self.vm_name} to {state.value}",
                                    self.state.value,
                                    [s.value for s in TRANSITIONS[self.state]],
                                    vm=self.vm_name)
        return replace(self, state=state, **changes)

    def failed_over(self, reason: str) -> "ReplicationRecord":
        """The record the failover transaction writes: the replica becomes the primary
        of a new generation; the old primary is remembered as the replica to resync
        (its copy is stale from now on and must never start)."""
        return self.to(State.FAILED_OVER, primary=self.replica, replica=self.primary,
                       generation=self.generation + 1, force_failover=False,
                       bytes_done=0, bytes_behind=0, export_uri=None, reason=reason,
                       exports={}, cycle_open=0, cycle_shipped=0, cycle_committed=0,
                       shipped_at=None, last_failover=reason,
                       failover_point=self.last_consistent_at)

    def reversed_to(self, replica: str, *, incremental: bool) -> "ReplicationRecord":
        """Re-establish replication from the new primary to ``replica``."""
        return self.to(State.RESYNCING, replica=replica, full_resync=not incremental,
                       bytes_done=0, export_uri=None, reason="", exports={},
                       cycle_open=0, cycle_shipped=0, cycle_committed=0, shipped_at=None)


def may_run(record: ReplicationRecord | None, host: str) -> bool:
    """Whether ``host`` may run the VM as far as replication is concerned: only the
    newest generation's primary (a record is always the newest generation)."""
    return record is None or record.state == State.DISABLED or record.primary == host


# --- failover: allowed, and at what cost ----------------------------------------------
@dataclass(frozen=True)
class FailoverVerdict:
    allowed: bool
    reason: str            # refused: why; allowed: what is lost (the data-loss window)
    forced: bool = False


def failover_verdict(record: ReplicationRecord) -> FailoverVerdict:
    """May the VM restart on ``record.replica`` from its image, and what is lost."""
    state, point = record.state, format_point(record.last_consistent_at)
    if state in (S.ENABLING, S.INITIAL_SYNC):
        done = (f" ({100 * record.bytes_done // record.disk_bytes}% copied)"
                if record.disk_bytes else "")
        return FailoverVerdict(False, f"replica on {record.replica} is still in its "
                                      f"initial sync{done}: no usable copy")
    if state == S.RESYNCING:
        return FailoverVerdict(False, f"replica on {record.replica} is mid-resync: its "
                                      "image is not a consistent copy")
    if state == S.FAILED_OVER:
        return FailoverVerdict(False, f"no replica since the failover to {record.primary} "
                                      f"(generation {record.generation}): not protected "
                                      "until a replica resyncs")
    if state in (S.DISABLING, S.DISABLED):
        return FailoverVerdict(False, "replication is being disabled")
    if state == S.IN_SYNC and record.mode == Mode.SYNC:
        return FailoverVerdict(True, "sync replica in-sync: no acknowledged write lost")
    if record.mode == Mode.ASYNC and state in (S.IN_SYNC, S.LAGGING):
        if state == S.IN_SYNC:
            window = f"about one {record.interval_s} s interval at most: cycles shipped on time"
        else:
            behind = f"{record.rpo_s:.0f} s" if record.rpo_s is not None else "unknown"
            window = f"lagging: {behind} behind at the last report, more since"
        return FailoverVerdict(True, f"async: back to the last consistent point {point}; "
                                     f"writes after it are lost ({window})")
    if record.last_consistent_at is None:
        return FailoverVerdict(False, f"replica on {record.replica} never held a "
                                      "complete copy: nothing to fail over to")
    risk = (f"replica on {record.replica} is {state.value} since {point}: failover "
            "would lose every write after it")
    if record.force_failover:
        return FailoverVerdict(True, f"FORCED by the user: {risk}", forced=True)
    return FailoverVerdict(False, f"{risk}; refused unless forced "
                                  "(replication failover --force)")


def protection(ha: bool, on_shared_storage: bool,
               record: ReplicationRecord | None) -> str:
    """The VM's ``ha_status`` wording (as ``cluster.vm_ops`` reports it today), with
    replication taken into account: protected only if a failover would happen now."""
    if not ha:
        return "not HA"
    if record is None or record.state == S.DISABLED:
        return "protected" if on_shared_storage else "not protected: disks on local storage"
    verdict = failover_verdict(record)
    if verdict.forced:
        return f"at risk: {verdict.reason}"      # it would fail over, losing data
    if not verdict.allowed:
        return f"not protected: {verdict.reason}"
    rpo = "" if record.mode == Mode.SYNC else f", every {record.interval_s} s"
    return (f"protected by {record.mode.value} replication to {record.replica} "
            f"({record.state.value}{rpo})")


def request_force(record: ReplicationRecord) -> ReplicationRecord:
    """The user's ``--force``: recorded, so the manager may fail over a broken replica.
    Refused where it would not help (no usable copy) or is not needed."""
    verdict = failover_verdict(record)
    if verdict.allowed and not verdict.forced:
        raise StateError(f"force failover of {record.vm_name} (not needed: "
                         f"{verdict.reason})", record.state.value,
                         [S.BROKEN.value], vm=record.vm_name)
    if record.state not in COPY_USABLE or record.last_consistent_at is None:
        raise StateError(f"force failover of {record.vm_name} ({verdict.reason})",
                         record.state.value, [s.value for s in COPY_USABLE],
                         vm=record.vm_name)
    return replace(record, force_failover=True)


# --- what an agent does with a record it finds (also after a restart) ---------------------
class Step(str, enum.Enum):
    NOTHING = "nothing"
    PREPARE_TARGET = "prepare_target"     # replica: create the image, open the export,
                                          # write initial-sync with export_uri
    START_COPY = "start_copy"             # primary: initial full copy (sync: an active
                                          # mirror in write-blocking mode; async: a full
                                          # backup, then a persistent dirty bitmap)
    ENSURE_MIRROR = "ensure_mirror"       # primary, sync: the mirror job exists (re-attach
                                          # after an agent restart)
    SHIP_CHANGES = "ship_changes"         # primary, async: a cycle is due: ship the dirty
                                          # blocks, then write last_consistent_at
    MARK_LAGGING = "mark_lagging"         # primary, async: a cycle due, replica away
    MARK_BROKEN = "mark_broken"           # primary, sync: replica away past the stall
                                          # limit: commit broken, THEN release writes
    START_RESYNC = "start_resync"         # primary: replica back: write resyncing, copy
                                          # the dirty blocks (all when full_resync)
    SERVE_TARGET = "serve_target"         # replica: keep the export open (after restart)
    STOP_STALE_COPY = "stop_stale_copy"   # a host that is not the primary runs the VM
    STOP_JOBS = "stop_jobs"               # primary, disabling: cancel jobs, drop bitmaps,
                                          # write primary_stopped
    DROP_REPLICA = "drop_replica"         # replica, disabling: delete its image, close
                                          # the export, write disabled
    DELETE_RECORD = "delete_record"       # primary: disabled: remove the key


@dataclass(frozen=True)
class LocalFacts:
    """What the deciding host knows locally (times measured on its monotonic clock)."""

    host: str
    working: bool = False          # a task of this service already handles the record
    has_vm: bool = False           # a QEMU of the VM is alive on this host
    peer_is_member: bool = True    # the other host holds a live lease
    peer_unreachable_s: float = 0.0    # how long the replication link has been down
    cycle_due: bool = False        # async: the interval elapsed since the last cycle


def next_step(record: ReplicationRecord, local: LocalFacts) -> Step:
    """The one thing ``local.host`` must do about ``record`` now."""
    role = record.role_of(local.host)
    if role is None:
        return Step.NOTHING
    if role == "replica" and local.has_vm:
        return Step.STOP_STALE_COPY       # never two writers: the primary's copy wins
    if local.working:
        return Step.NOTHING
    if role == "primary":
        return _primary_step(record, local)
    return _replica_step(record, local)


def _primary_step(record: ReplicationRecord, local: LocalFacts) -> Step:
    state = record.state
    if state == S.DISABLING:
        return Step.NOTHING if record.primary_stopped else Step.STOP_JOBS
    if state == S.DISABLED:
        return Step.DELETE_RECORD
    if not local.has_vm:
        return Step.NOTHING               # nothing writes: nothing to replicate now
    away = local.peer_unreachable_s > 0 or not local.peer_is_member
    if state == S.INITIAL_SYNC:
        return Step.START_COPY
    if state in (S.BROKEN, S.RESYNCING):
        return Step.NOTHING if away else Step.START_RESYNC
    if state not in (S.IN_SYNC, S.LAGGING):
        return Step.NOTHING               # enabling: the replica's turn; failed-over:
                                          # the manager picks the new replica
    if record.mode == Mode.SYNC:
        if local.peer_unreachable_s >= record.stall_limit_s or not local.peer_is_member:
            return Step.MARK_BROKEN
        return Step.ENSURE_MIRROR
    if not local.cycle_due:
        return Step.NOTHING
    if away:
        return Step.NOTHING if state == S.LAGGING else Step.MARK_LAGGING
    return Step.SHIP_CHANGES


def _replica_step(record: ReplicationRecord, local: LocalFacts) -> Step:
    state = record.state
    if state == S.ENABLING:
        return Step.PREPARE_TARGET
    if state in RECEIVING or state == S.BROKEN:
        return Step.SERVE_TARGET          # broken: ready for the primary's resync
    if state == S.DISABLING and (record.primary_stopped or not local.peer_is_member):
        return Step.DROP_REPLICA
    return Step.NOTHING
