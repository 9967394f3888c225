"""Dynamic memory policy (Hyper-V's Dynamic Memory): a pure function.

Inputs: for each VM its bounds (min, max, buffer %), the balloon target it has now and
what its guest last reported (total and available memory); plus the host's free
memory. Output: the new balloon targets. Nothing here reads /proc, speaks QMP or
sleeps; ``dynamic_memory_loop`` gathers the inputs and applies the result.

Rules, in order:

1. A VM wants ``used * (1 + buffer/100)`` (used = guest total - guest available),
   clamped to [min, max]. Without guest statistics it keeps its target (clamped).
2. Changes smaller than ``min_change`` are ignored (no churn from noise).
3. VMs that want less give it back at once (the guest keeps its buffer above use).
4. VMs that want more get it neediest first (lowest available/total), but the sum of
   all increases never exceeds the host's free memory minus its reserve; a VM may get
   part of what it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GuestMemory:
    """One dynamic-memory VM as the policy sees it (bytes)."""

    name: str
    min_bytes: int
    max_bytes: int
    buffer_pct: int
    target_bytes: int                     # the balloon target now
    guest_total_bytes: int | None = None  # None: the guest has not reported yet
    guest_available_bytes: int | None = None

    @property
    def has_stats(self) -> bool:
        return bool(self.guest_total_bytes) and self.guest_available_bytes is not None

    @property
    def pressure(self) -> float:
        """0 = idle, 1 = nothing left available."""
        if not self.has_stats:
            return 0.0
        return 1.0 - self.guest_available_bytes / self.guest_total_bytes  # type: ignore[operator]


@dataclass(frozen=True)
class PolicySettings:
    host_reserve_bytes: int = 256 * MIB     # never hand this out to guests
    min_change_bytes: int = 8 * MIB
    align_bytes: int = MIB                  # balloon targets in whole MiB


def wanted_bytes(vm: GuestMemory, settings: PolicySettings) -> int:
    """Rule 1: what this VM should have, ignoring the host."""
    if not vm.has_stats:
        return _clamp(vm.target_bytes, vm)
    used = vm.guest_total_bytes - vm.guest_available_bytes  # type: ignore[operator]
    wanted = used + used * vm.buffer_pct // 100
    wanted += -wanted % settings.align_bytes
    return _clamp(wanted, vm)


def _clamp(value: int, vm: GuestMemory) -> int:
    return max(vm.min_bytes, min(vm.max_bytes, value))


def decide_targets(vms: list[GuestMemory], host_free_bytes: int,
                   settings: PolicySettings = PolicySettings()) -> dict[str, int]:
    """New balloon targets for the VMs whose target should change (name -> bytes)."""
    changes: dict[str, int] = {}
    growers: list[tuple[GuestMemory, int]] = []
    for vm in vms:
        wanted = wanted_bytes(vm, settings)
        out_of_bounds = _clamp(vm.target_bytes, vm) != vm.target_bytes
        if abs(wanted - vm.target_bytes) < settings.min_change_bytes and not out_of_bounds:
            continue
        if wanted < vm.target_bytes:
            changes[vm.name] = wanted               # rule 3: give back at once
        else:
            growers.append((vm, wanted))
    budget = max(0, host_free_bytes - settings.host_reserve_bytes)
    for vm, wanted in sorted(growers, key=lambda item: (-item[0].pressure, item[0].name)):
        floor = _clamp(vm.target_bytes, vm)         # bounds always apply, budget or not
        grant = min(wanted - floor, budget)
        grant -= grant % settings.align_bytes
        budget -= grant
        if floor + grant != vm.target_bytes:
            changes[vm.name] = floor + grant
    return changes
