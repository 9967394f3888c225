"""When to push a live migration harder: the convergence policy.

Pure: no I/O and no clock reads. The engine (``parvisor.migration.engine``) polls
``query-migrate``, turns each reply into a ``MigrationSample`` and asks ``next_action``
what to do; time arrives inside the sample (``elapsed_s``, QEMU's own counter).

The rule, in order of escalation:

1. Start with a tight downtime limit (``max_downtime_ms``).
2. A *pass* is one sweep over the dirty pages (QEMU's ``dirty-sync-count``). When the
   memory left after each pass stops shrinking for ``stall_passes`` passes, the guest
   dirties memory about as fast as the link carries it: raise the downtime limit by
   ``downtime_step_ms`` (or straight to QEMU's expected downtime when that is within
   the ceiling, plus a margin), never above ``downtime_ceiling_ms``.
3. Still stalled at the ceiling (or after ``auto_converge_after`` stalled passes in
   all): throttle the guest's vCPUs (QEMU auto-converge), or switch to post-copy when
   the policy allows it.
4. Past ``completion_timeout_s``: abort with the numbers that explain why.

Never: abort or cancel once post-copy runs (the VM's state is split between the hosts
and only finishing can save it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Union

# A pass counts as progress only when it beats the best of the window by this much;
# remaining memory that wobbles within 5 % is a stall, not convergence.
MIN_SHRINK = 0.05
# Jumping to QEMU's expected downtime: add this much so the next pass fits under it.
EXPECTED_DOWNTIME_MARGIN = 1.2
# QEMU's own limit for downtime-limit (ms).
QEMU_MAX_DOWNTIME_MS = 2_000_000
# Statuses in which a migration is still moving (QEMU's MigrationStatus).
ACTIVE_STATUSES = frozenset({"setup", "active", "device", "pre-switchover",
                             "postcopy-active", "postcopy-paused", "postcopy-recover",
                             "cancelling", "wait-unplug"})
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})
POSTCOPY_STATUSES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})


@dataclass(frozen=True)
class ConvergencePolicy:
    """How a live migration is tuned and when it is pushed or given up.

    Defaults, and why:

    * ``max_downtime_ms = 100``: the initial limit on the final stop-and-copy pause.
      Proxmox starts at 100 ms, QEMU's own default is 300 ms. 100 ms is below what TCP
      sessions and most interactive users notice, and an idle or lightly written guest
      converges under it on any LAN; busy guests earn more through the steps below.
    * ``downtime_step_ms = 200`` / ``downtime_ceiling_ms = 2000``: a stalled migration
      gets +200 ms per stall (or QEMU's expected downtime when that already fits), up
      to 2 s. Beyond 2 s, TCP retransmits and heartbeats (ours: the guest agent) start
      to fail; throttling the guest is the better trade there.
    * ``stall_passes = 2``: two sweeps without a new low in remaining memory. One pass
      can be noisy (a burst of writes); waiting longer only burns link time.
    * ``auto_converge_after = 6``: stalled passes in all after which the vCPUs are
      throttled even below the ceiling; None never throttles. Throttling slows the
      guest itself, so it comes after the cheaper downtime steps.
    * ``completion_timeout_s = 600``: then abort; the source keeps running.
    * ``bandwidth_bytes_per_s = None``: unlimited. QEMU's default cap (128 MiB/s, about
      1 Gbit/s) would throttle a dedicated 10/25 Gbit migration network for nothing; the
      engine sets a cap QEMU treats as unlimited. Set a value on a shared link.
    * ``xbzrle = False``: XBZRLE sends deltas of pages re-written since the last pass.
      It needs a cache on the source (``xbzrle_cache_bytes``) and source CPU for every
      page; on a fast LAN the CPU, not the link, becomes the limit and it slows the
      migration. It pays off when the link is slow or capped (≤ 1 Gbit/s, WAN, a set
      ``bandwidth_bytes_per_s``) *and* the guest rewrites the same pages (databases,
      caches): turn it on for those. Capabilities cannot change mid-migration, so it
      cannot be switched on "when needed" later.
    * ``multifd_channels = 0`` (off): several TCP streams pay off only when one
      migration thread cannot fill the link (≥ 25 Gbit/s). They cost a thread per
      channel on both hosts (competing with vCPUs), rule out XBZRLE and post-copy in
      QEMU 7.2, and must be set identically on the destination.
    * ``postcopy = False``: post-copy starts the guest on the destination before all
      memory arrived and pulls missing pages on demand. It always converges, but **if
      the link or the destination fails during post-copy, the VM is lost**: its memory
      is split between the two hosts and neither can run it. Opt in per VM only.
    """

    max_downtime_ms: int = 100
    downtime_step_ms: int = 200
    downtime_ceiling_ms: int = 2000
    stall_passes: int = 2
    auto_converge_after: int | None = 6
    completion_timeout_s: float = 600.0
    bandwidth_bytes_per_s: int | None = None
    xbzrle: bool = False
    xbzrle_cache_bytes: int = 64 << 20
    multifd_channels: int = 0
    postcopy: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_downtime_ms <= self.downtime_ceiling_ms <= QEMU_MAX_DOWNTIME_MS:
            raise ValueError("need 1 <= max_downtime_ms <= downtime_ceiling_ms <= "
                             f"{QEMU_MAX_DOWNTIME_MS}")
        if self.downtime_step_ms < 1 or self.stall_passes < 1:
            raise ValueError("downtime_step_ms and stall_passes must be at least 1")
        if self.auto_converge_after is not None and self.auto_converge_after < 0:
            raise ValueError("auto_converge_after must be >= 0 or None")
        if self.completion_timeout_s <= 0:
            raise ValueError("completion_timeout_s must be positive")
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s < 1:
            raise ValueError("bandwidth_bytes_per_s must be positive or None")
        if self.multifd_channels < 0:
            raise ValueError("multifd_channels must be >= 0")
        if self.multifd_channels and self.postcopy:
            raise ValueError("QEMU 7.2 cannot combine multifd with post-copy")


@dataclass(frozen=True)
class MigrationSample:
    """One ``query-migrate`` reading on the source."""

    status: str
    elapsed_s: float = 0.0                 # QEMU's total-time so far
    ram_total: int = 0
    ram_remaining: int = 0
    ram_transferred: int = 0
    dirty_pages_rate: int = 0              # pages/s
    dirty_sync_count: int = 0              # the pass number (1 = the bulk pass)
    mbps: float = 0.0                      # QEMU's throughput, Mbit/s
    page_size: int = 4096
    disk_total: int = 0
    disk_remaining: int = 0
    expected_downtime_ms: int | None = None
    setup_time_ms: int = 0
    downtime_ms: int | None = None         # known once completed
    error: str | None = None

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> "MigrationSample":
        ram = reply.get("ram") or {}
        disk = reply.get("disk") or {}
        return cls(status=str(reply.get("status", "none")),
                   elapsed_s=float(reply.get("total-time", 0)) / 1000.0,
                   ram_total=int(ram.get("total", 0)),
                   ram_remaining=int(ram.get("remaining", 0)),
                   ram_transferred=int(ram.get("transferred", 0)),
                   dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
                   dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
                   mbps=float(ram.get("mbps", 0.0)),
                   page_size=int(ram.get("page-size", 4096)) or 4096,
                   disk_total=int(disk.get("total", 0)),
                   disk_remaining=int(disk.get("remaining", 0)),
                   expected_downtime_ms=reply.get("expected-downtime"),
                   setup_time_ms=int(reply.get("setup-time", 0)),
                   downtime_ms=reply.get("downtime"),
                   error=reply.get("error-desc"))

    @property
    def dirty_rate_bytes_per_s(self) -> int:
        return self.dirty_pages_rate * self.page_size

    @property
    def throughput_bytes_per_s(self) -> float:
        return self.mbps * 1e6 / 8


# --- actions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SetDowntime:
    ms: int


@dataclass(frozen=True)
class EnableAutoConverge:
    pass


@dataclass(frozen=True)
class StartPostcopy:
    pass


@dataclass(frozen=True)
class Abort:
    reason: str


Action = Union[SetDowntime, EnableAutoConverge, StartPostcopy, Abort]


@dataclass(frozen=True)
class ConvergenceState:
    """What the policy remembers between samples."""

    downtime_limit_ms: int
    last_pass: int = 0
    # remaining bytes at the start of each recent pass (oldest first); the first entry
    # is the reference the newer ones must beat
    pass_remaining: tuple[int, ...] = ()
    stalled_passes: int = 0            # stalled passes in all (for auto_converge_after)
    auto_converge: bool = False
    postcopy_started: bool = False
    aborted: bool = False

    @classmethod
    def initial(cls, policy: ConvergencePolicy) -> "ConvergenceState":
        return cls(downtime_limit_ms=policy.max_downtime_ms,
                   auto_converge=policy.auto_converge_after == 0)


def next_action(policy: ConvergencePolicy, state: ConvergenceState,
                sample: MigrationSample) -> tuple[ConvergenceState, list[Action]]:
    """The new state and what to do for one sample (usually nothing)."""
    if state.aborted or sample.status not in ACTIVE_STATUSES or sample.status == "cancelling":
        return state, []
    if sample.status in POSTCOPY_STATUSES:
        return state, []     # never abort post-copy: finishing is the only way out
    if sample.elapsed_s >= policy.completion_timeout_s:
        return replace(state, aborted=True), [Abort(_timeout_reason(policy, state, sample))]
    if sample.status != "active" or sample.dirty_sync_count <= state.last_pass:
        return state, []

    # A new pass started: record what it has to send.
    history = (*state.pass_remaining, sample.ram_remaining)[-(policy.stall_passes + 1):]
    state = replace(state, last_pass=sample.dirty_sync_count, pass_remaining=history)
    if sample.dirty_sync_count < 2 or not _stalled(history, policy.stall_passes):
        return state, []

    # Stalled: escalate one step, then wait stall_passes passes to see the effect.
    state = replace(state, stalled_passes=state.stalled_passes + policy.stall_passes,
                    pass_remaining=(sample.ram_remaining,))
    actions: list[Action] = []
    at_ceiling = state.downtime_limit_ms >= policy.downtime_ceiling_ms
    if not at_ceiling:
        limit = _raised_limit(policy, state.downtime_limit_ms, sample)
        state = replace(state, downtime_limit_ms=limit)
        actions.append(SetDowntime(limit))
    too_long = (policy.auto_converge_after is not None
                and state.stalled_passes >= policy.auto_converge_after)
    if at_ceiling or too_long:
        if policy.postcopy and not state.postcopy_started and at_ceiling:
            state = replace(state, postcopy_started=True)
            actions.append(StartPostcopy())
        elif policy.auto_converge_after is not None and not state.auto_converge:
            state = replace(state, auto_converge=True)
            actions.append(EnableAutoConverge())
    return state, actions


def _stalled(history: tuple[int, ...], stall_passes: int) -> bool:
    """No pass of the last ``stall_passes`` beat the reference pass before them."""
    if len(history) < stall_passes + 1:
        return False
    reference, recent = history[0], history[1:]
    return min(recent) > reference * (1 - MIN_SHRINK)


def _raised_limit(policy: ConvergencePolicy, current: int, sample: MigrationSample) -> int:
    limit = current + policy.downtime_step_ms
    expected = sample.expected_downtime_ms
    if expected is not None and expected > 0:
        wanted = math.ceil(expected * EXPECTED_DOWNTIME_MARGIN)
        if wanted <= policy.downtime_ceiling_ms:
            limit = max(limit, wanted)
    return min(limit, policy.downtime_ceiling_ms)


def _timeout_reason(policy: ConvergencePolicy, state: ConvergenceState,
                    sample: MigrationSample) -> str:
    mib = 1 << 20
    return (f"migration did not complete within {policy.completion_timeout_s:g} s"
            f" (pass {sample.dirty_sync_count}, {sample.ram_remaining / mib:.1f} MiB"
            f" of {sample.ram_total / mib:.1f} MiB left, guest dirtying"
            f" {sample.dirty_rate_bytes_per_s / mib:.1f} MiB/s, link"
            f" {sample.throughput_bytes_per_s / mib:.1f} MiB/s, downtime limit"
            f" {state.downtime_limit_ms} ms{', vCPUs throttled' if state.auto_converge else ''})")


def eta_s(sample: MigrationSample) -> float | None:
    """Seconds until the RAM is across at the current throughput, net of what the guest
    dirties meanwhile; None when unknown (no throughput yet) or not converging."""
    if sample.status == "completed":
        return 0.0
    rate = sample.throughput_bytes_per_s
    if sample.status not in ACTIVE_STATUSES or rate <= 0 or sample.ram_total <= 0:
        return None
    net = rate - (sample.dirty_rate_bytes_per_s if sample.dirty_sync_count >= 2 else 0)
    if net <= 0:
        return None
    return sample.ram_remaining / net + sample.disk_remaining / rate
