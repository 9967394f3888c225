"""The live-migration protocol between two host agents: the record both sides share in
etcd (``migration/<uuid>``), its phases, who may move it where, and what a restarted
agent must do. Pure: no I/O, no clock (times are passed in).

Phases (who writes each one):

    requested  ─source─▶ preparing ─dest─▶ prepared ─source─▶ performing ─source─▶ switched
        │                    │                 │                   │                  │
        └──source──▶ failed  └─────────── aborting (source or dest) ◀┘           dest ▼
                                              │                                 finished
                                    failed / cancelled (dest, after cleaning)     │ source
                                                                                   ▼
                                                                               completed

* ``requested``: written by the API on any host, in one txn that also checks no other
  migration of the VM is in flight (a second one gets 409) and remembers the owner
  revision (the fencing token the switch will compare).
* ``switched`` is written in the same etcd transaction that moves the owner record to
  the destination (compare owner token and this record's revision). Before it, the VM
  is the source's: every failure resumes the source and cleans the destination. After
  it, the VM is the destination's: the source never resumes its copy again.
* Terminal records stay (the CLI reads the result) until the next migration replaces them.

Never: resume the source's QEMU once the record says ``switched`` (or later); resume
the destination's before it does (INV-1: one running copy).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from parvisor.errors import StateError


class Phase(str, enum.Enum):
    REQUESTED = "requested"
    PREPARING = "preparing"
    PREPARED = "prepared"
    PERFORMING = "performing"
    SWITCHED = "switched"
    FINISHED = "finished"
    COMPLETED = "completed"
    ABORTING = "aborting"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


P = Phase
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    P.REQUESTED: frozenset({P.PREPARING, P.FAILED, P.CANCELLED}),
    P.PREPARING: frozenset({P.PREPARED, P.ABORTING}),
    P.PREPARED: frozenset({P.PERFORMING, P.ABORTING}),
    P.PERFORMING: frozenset({P.SWITCHED, P.ABORTING}),
    P.SWITCHED: frozenset({P.FINISHED}),
    P.FINISHED: frozenset({P.COMPLETED}),
    P.ABORTING: frozenset({P.FAILED, P.CANCELLED}),
    P.COMPLETED: frozenset(),
    P.FAILED: frozenset(),
    P.CANCELLED: frozenset(),
}
TERMINAL = frozenset({P.COMPLETED, P.FAILED, P.CANCELLED})
BEFORE_SWITCH = frozenset({P.REQUESTED, P.PREPARING, P.PREPARED, P.PERFORMING})
AFTER_SWITCH = frozenset({P.SWITCHED, P.FINISHED, P.COMPLETED})
CANCELLABLE = BEFORE_SWITCH


@dataclass(frozen=True)
class MigrationOptions:
    with_storage: bool = False
    max_downtime_ms: int | None = None        # None: the convergence policy's default
    bandwidth_bytes_per_s: int | None = None  # None: unlimited on the migration network
    live: bool = True                         # False: quick migration (save, move, restore)


@dataclass(frozen=True)
class MigrationRecord:
    """``migration/<uuid>`` in etcd (JSON). ``revision`` is the key's mod revision
    (not stored in the value): every write compares it."""

    vm_uuid: str
    vm_name: str
    source: str
    destination: str
    phase: Phase
    owner_revision: int                    # the owner token when requested
    options: MigrationOptions = field(default_factory=MigrationOptions)
    requested_at: float = 0.0              # wall clock, for humans
    source_was_running: bool = True        # False: a paused VM moves paused
    incoming_uri: str | None = None        # tcp:host:port on the destination
    nbd_uri: str | None = None             # shared-nothing: the destination's NBD export
    source_disks: dict[str, int] = field(default_factory=dict)  # disk id -> virtual size
    source_owned: dict[str, str] = field(default_factory=dict)  # removed after completion
    dest_disks: dict[str, str] = field(default_factory=dict)   # disk id -> dest path
    cancel_requested: bool = False
    reason: str = ""                       # why it failed / was cancelled
    progress: dict[str, Any] = field(default_factory=dict)     # last MigrationProgress
    result: dict[str, Any] = field(default_factory=dict)       # total_time_ms, downtime_ms…
    dest_cleaned: bool = False             # aborted: the destination removed its copy
    tls: bool = False                      # the stream is encrypted (the source's setting)
    machine_type: str | None = None        # the source's versioned machine type
    revision: int = 0

    # --- (de)serialisation ----------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data.pop("revision")
        data["phase"] = self.phase.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, revision: int) -> "MigrationRecord":
        data = json.loads(raw)
        data["phase"] = Phase(data["phase"])
        data["options"] = MigrationOptions(**data.get("options", {}))
        return cls(**data, revision=revision)

    # --- facts ------------------------------------------------------------------------
    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def switched(self) -> bool:
        return self.phase in AFTER_SWITCH

    def role_of(self, host: str) -> str | None:
        if host == self.source:
            return "source"
        if host == self.destination:
            return "destination"
        return None

    def to(self, phase: Phase, **changes: Any) -> "MigrationRecord":
        """The next record; a move not in ``TRANSITIONS`` is a logic error."""
        if phase not in TRANSITIONS[self.phase]:
            raise StateError(f"move migration of {self.vm_name} to {phase.value}",
                             self.phase.value, [p.value for p in TRANSITIONS[self.phase]],
                             vm=self.vm_name)
        return replace(self, phase=phase, **changes)

    def public(self) -> dict[str, Any]:
        """What the API returns."""
        data = json.loads(self.to_json())
        data["revision"] = self.revision
        return data


# --- what an agent does with a record it finds (also after a restart) -----------------
class Step(str, enum.Enum):
    NOTHING = "nothing"
    CHECK_AND_PREPARE = "check_and_prepare"     # source: compatibility, then preparing
    PREPARE_INCOMING = "prepare_incoming"       # destination: start the incoming QEMU
    PERFORM = "perform"                         # source: stream (or keep streaming)
    RECOVER_SOURCE = "recover_source"           # source restarted mid-way: resume, abort
    ABORT_INCOMING = "abort_incoming"           # destination: drop its copy, report
    RESUME_INCOMING = "resume_incoming"         # destination: the VM is ours now, run it
    DROP_SOURCE_COPY = "drop_source_copy"       # source: quit the paused copy, confirm
    FINALISE_ABORT = "finalise_abort"           # source: dest gone/clean: write the end


@dataclass(frozen=True)
class LocalFacts:
    """What the deciding host knows locally."""

    host: str
    working: bool                  # a task of this service already handles the record
    has_copy: bool                 # a QEMU of the VM is alive on this host
    peer_is_member: bool           # the other host holds a live lease


def next_step(record: MigrationRecord, local: LocalFacts) -> Step:
    """The one thing ``local.host`` must do about ``record`` now (NOTHING if a task of
    this service is already on it, or it is the other side's turn)."""
    role = record.role_of(local.host)
    if role is None or local.working:
        return Step.NOTHING
    if role == "source":
        return _source_step(record, local)
    return _destination_step(record, local)


def _source_step(record: MigrationRecord, local: LocalFacts) -> Step:
    phase = record.phase
    if phase == P.REQUESTED:
        return Step.CHECK_AND_PREPARE
    if phase in (P.PREPARING, P.PREPARED, P.PERFORMING):
        # No task of ours is on it: this service restarted mid-way (or never saw it).
        # Before the switch the VM is ours: resume it and abort, never guess.
        return Step.RECOVER_SOURCE
    if phase in (P.SWITCHED, P.FINISHED):
        return Step.DROP_SOURCE_COPY
    if phase == P.ABORTING and not local.peer_is_member:
        return Step.FINALISE_ABORT      # nobody will report the destination clean
    return Step.NOTHING


def _destination_step(record: MigrationRecord, local: LocalFacts) -> Step:
    phase = record.phase
    if phase == P.PREPARING:
        # A fresh request; or we restarted while preparing (a copy is left): abort,
        # nothing was streamed yet, the source runs on untouched.
        return Step.ABORT_INCOMING if local.has_copy else Step.PREPARE_INCOMING
    if phase in (P.PREPARED, P.PERFORMING):
        # Restarted while the source streams: our incoming QEMU is no longer watched by
        # anyone here (or gone); the stream cannot be trusted. Abort.
        return Step.ABORT_INCOMING
    if phase == P.ABORTING:
        return Step.ABORT_INCOMING
    if phase == P.SWITCHED:
        return Step.RESUME_INCOMING
    if record.terminal and record.phase != P.COMPLETED and not record.dest_cleaned:
        return Step.ABORT_INCOMING       # finalised by the source while we were away
    return Step.NOTHING
