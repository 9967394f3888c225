"""VM lifecycle states and the one function that changes them.

The table ``TRANSITIONS`` is the whole lifecycle: an edge not in it is refused with a
``StateError`` that names the current and the allowed states. ``ACTIONS`` says from
which states each user action may start; operations check it before doing anything.
"""

from __future__ import annotations

import enum
import logging

from parvisor.errors import StateError

log = logging.getLogger(__name__)


class VmState(str, enum.Enum):
    OFF = "off"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SAVING = "saving"
    SAVED = "saved"
    STOPPING = "stopping"
    CRASHED = "crashed"

    def __str__(self) -> str:  # so f-strings print "running", not "VmState.RUNNING"
        return self.value


S = VmState

# from-state -> states it may move to
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    S.OFF: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.PAUSED, S.OFF, S.CRASHED, S.SAVED}),
    S.RUNNING: frozenset({S.PAUSED, S.SAVING, S.STOPPING, S.OFF, S.CRASHED}),
    S.PAUSED: frozenset({S.RUNNING, S.SAVING, S.STOPPING, S.OFF, S.CRASHED}),
    S.SAVING: frozenset({S.SAVED, S.RUNNING, S.PAUSED, S.CRASHED, S.OFF}),
    S.SAVED: frozenset({S.STARTING, S.OFF}),
    S.STOPPING: frozenset({S.OFF, S.CRASHED, S.RUNNING}),
    S.CRASHED: frozenset({S.STARTING, S.OFF}),
}

# user action -> states it may be asked in
ACTIONS: dict[str, frozenset[VmState]] = {
    "start": frozenset({S.OFF, S.SAVED, S.CRASHED}),
    "restore": frozenset({S.SAVED}),
    "shutdown": frozenset({S.RUNNING, S.PAUSED}),
    "turn-off": frozenset({S.RUNNING, S.PAUSED, S.STARTING, S.STOPPING, S.SAVING, S.SAVED,
                           S.CRASHED}),
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "save": frozenset({S.RUNNING, S.PAUSED}),
    "restart": frozenset({S.RUNNING, S.PAUSED}),
    "delete": frozenset({S.OFF, S.CRASHED, S.SAVED}),
    "edit": frozenset({S.OFF, S.CRASHED}),
    "exec": frozenset({S.RUNNING}),
    "hot-plug": frozenset({S.RUNNING}),      # vm set / nic / disk on a live VM
    "console": frozenset({S.RUNNING, S.PAUSED, S.STARTING}),
}

ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.SAVING, S.STOPPING})
"""States in which a QEMU process exists for the VM."""


def check_action(action: str, current: VmState, *, vm: str | None = None) -> None:
    """Refuse ``action`` unless it may start from ``current``."""
    allowed = ACTIONS[action]
    if current not in allowed:
        raise StateError(action, current.value, [s.value for s in allowed], vm=vm)


def check_transition(current: VmState, target: VmState, *, vm: str | None = None) -> None:
    """Validate one edge; no-ops are refused too, they always hide a logic error."""
    if target not in TRANSITIONS[current]:
        allowed = [s.value for s in TRANSITIONS[current]]
        raise StateError(f"move to {target.value}", current.value, allowed, vm=vm)
    log.info("vm %s: state from %s to %s", vm, current.value, target.value)
