"""Host-side safety: when a host must kill its HA VMs, and which processes to kill.

What for: the agent and the watchdog compute the self-fence deadline with these pure
functions; the simulator uses the same ones. The deadline is measured from the moment
the last *successful* keepalive was **sent** (not when its reply came back), on the
monotonic clock: etcd can only have received it after it was sent, so the lease in
etcd cannot expire before ``sent + ttl``; killing by ``sent + ttl - margin`` leaves
``margin`` for clock-rate drift and for the kill itself (RELIABILITY.md).

Never: read a clock (callers pass ``now`` from ``time.monotonic()``), touch processes.
Non-HA VMs are never fenced: nobody restarts them elsewhere, so they cannot run twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from parvisor.errors import InvalidInput


@dataclass(frozen=True)
class LocalVm:
    """A VM process on this host, as the agent sees it."""

    uuid: str
    ha: bool
    pid: int | None = None
    owned_here: bool | None = None   # None: ownership unknown (etcd unreachable)
    incoming: bool = False           # a live-migration target, paused until the switch


def fence_deadline(last_ok_sent: float, ttl_s: float, margin_s: float) -> float:
    """Monotonic time by which this host must have killed its HA VMs."""
    if margin_s <= 0 or margin_s >= ttl_s:
        raise InvalidInput("fence margin must be positive and smaller than the lease TTL",
                           ttl_s=ttl_s, margin_s=margin_s)
    return last_ok_sent + ttl_s - margin_s


def must_fence(now: float, last_ok_sent: float | None, ttl_s: float,
               margin_s: float) -> bool:
    """True once the deadline passed. No successful keepalive yet: nothing may run."""
    if last_ok_sent is None:
        return True
    return now >= fence_deadline(last_ok_sent, ttl_s, margin_s)


def to_kill_at_deadline(vms: list[LocalVm]) -> list[LocalVm]:
    """At the deadline: every HA VM, whatever its owner record says."""
    return sorted((vm for vm in vms if vm.ha), key=lambda vm: vm.uuid)


def orphans(vms: list[LocalVm]) -> list[LocalVm]:
    """Processes whose fresh owner record names another host (INV-5): kill any time.
    Unknown ownership (``owned_here is None``) is never a reason to kill, and neither
    is an incoming migration copy (owned elsewhere until the switch, paused; the
    migration protocol removes it when the migration fails)."""
    return sorted((vm for vm in vms if vm.owned_here is False and not vm.incoming),
                  key=lambda vm: vm.uuid)
