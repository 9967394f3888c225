"""The dynamic memory policy, as tables: inputs -> new balloon targets."""

from __future__ import annotations

import pytest

from parvisor.ops.dynamic_memory import GuestMemory, PolicySettings, decide_targets, wanted_bytes

M = 1 << 20
SETTINGS = PolicySettings(host_reserve_bytes=256 * M, min_change_bytes=8 * M)


def vm(name="a", *, lo=128, hi=1024, buf=20, target=256, total=None, avail=None):
    return GuestMemory(name, lo * M, hi * M, buf, target * M,
                       None if total is None else total * M,
                       None if avail is None else avail * M)


@pytest.mark.parametrize("guest, expected", [
    (vm(total=256, avail=56), 240),                 # used 200 + 20 %
    (vm(total=256, avail=246), 128),                # idle: down to min
    (vm(total=1024, avail=24), 1024),               # capped at max
    (vm(target=300), 300),                          # no statistics: keep
    (vm(target=2000), 1024),                        # no statistics, out of bounds: clamp
    (vm(buf=100, total=256, avail=156), 200),       # used 100, buffer 100 %
])
def test_wanted(guest, expected):
    assert wanted_bytes(guest, SETTINGS) == expected * M


@pytest.mark.parametrize("guests, host_free, expected", [
    # an idle guest gives memory back, whatever the host has
    ([vm(total=256, avail=246)], 0, {"a": 128 * M}),
    # a guest under pressure receives more when the host has it
    ([vm(total=256, avail=16)], 4096 * M, {"a": 288 * M}),
    # ... but never beyond host free memory minus the reserve (270 - 256 = 14 MiB)
    ([vm(total=256, avail=16)], 270 * M, {"a": 270 * M}),
    # nothing free on the host: no growth at all
    ([vm(total=256, avail=16)], 100 * M, {}),
    # small differences are noise
    ([vm(total=256, avail=46)], 4096 * M, {}),
    # the neediest guest is served first from a small budget (64 MiB)
    ([vm("calm", total=256, avail=20), vm("hot", total=256, avail=4)], 320 * M,
     {"hot": 303 * M, "calm": 273 * M}),
    # one gives back while another grows in the same round
    ([vm("idle", total=512, avail=480, target=512), vm("busy", total=256, avail=10)],
     4096 * M, {"idle": 128 * M, "busy": 296 * M}),
])
def test_decide(guests, host_free, expected):
    assert decide_targets(guests, host_free, SETTINGS) == expected


def test_targets_stay_within_bounds_for_any_input():
    for total in (64, 256, 1024, 4096):
        for avail in (0, 10, total // 2, total):
            for free in (0, 512, 1 << 14):
                guest = vm(total=total, avail=avail, target=256)
                new = decide_targets([guest], free * M, SETTINGS).get("a", guest.target_bytes)
                assert 128 * M <= new <= 1024 * M
                assert new - guest.target_bytes <= max(0, free * M - 256 * M)
