"""The convergence policy: sequences of query-migrate samples -> actions. No clock, no
QEMU: time is the sample's elapsed_s."""

from __future__ import annotations

import pytest

from parvisor.migration.policy import (Abort, ConvergencePolicy, ConvergenceState,
                                       EnableAutoConverge, MigrationSample, SetDowntime,
                                       StartPostcopy, eta_s, next_action)

MIB = 1 << 20


def sample(pass_: int, remaining_mib: float, *, elapsed: float = 1.0, status: str = "active",
           expected_ms: int | None = None, mbps: float = 800.0,
           dirty_pages: int = 0) -> MigrationSample:
    return MigrationSample(status=status, elapsed_s=elapsed, ram_total=1024 * MIB,
                           ram_remaining=int(remaining_mib * MIB), dirty_sync_count=pass_,
                           mbps=mbps, dirty_pages_rate=dirty_pages,
                           expected_downtime_ms=expected_ms)


def run(policy: ConvergencePolicy, samples: list[MigrationSample]
        ) -> tuple[ConvergenceState, list[list[object]]]:
    state = ConvergenceState.initial(policy)
    out = []
    for s in samples:
        state, actions = next_action(policy, state, s)
        out.append(actions)
    return state, out


def flat(actions: list[list[object]]) -> list[object]:
    return [a for batch in actions for a in batch]


def test_defaults_are_the_documented_ones() -> None:
    p = ConvergencePolicy()
    assert p.max_downtime_ms == 100 and p.downtime_ceiling_ms == 2000
    assert p.bandwidth_bytes_per_s is None and p.multifd_channels == 0
    assert not p.postcopy and not p.xbzrle
    assert ConvergenceState.initial(p).downtime_limit_ms == 100


def test_a_converging_migration_needs_no_action() -> None:
    samples = [sample(1, 900), sample(1, 500), sample(2, 120), sample(3, 40), sample(4, 8),
               sample(4, 0, status="completed")]
    state, actions = run(ConvergencePolicy(), samples)
    assert flat(actions) == []
    assert state.downtime_limit_ms == 100 and not state.auto_converge


def test_samples_within_one_pass_count_once() -> None:
    # many samples of the same pass never look like a stall
    samples = [sample(1, 900)] + [sample(2, 300)] * 10
    assert flat(run(ConvergencePolicy(), samples)[1]) == []


def test_stall_raises_the_downtime_limit_by_one_step() -> None:
    policy = ConvergencePolicy(stall_passes=2, downtime_step_ms=200)
    # pass 2 sets the reference; passes 3 and 4 do not go below it by 5 %
    state, actions = run(policy, [sample(1, 900), sample(2, 300), sample(3, 310),
                                  sample(4, 290)])
    assert actions[-1] == [SetDowntime(300)]
    assert flat(actions[:-1]) == []
    assert state.downtime_limit_ms == 300


def test_one_good_pass_in_the_window_is_progress() -> None:
    policy = ConvergencePolicy(stall_passes=2)
    _, actions = run(policy, [sample(1, 900), sample(2, 300), sample(3, 200),
                              sample(4, 310)])
    assert flat(actions) == []


def test_after_a_step_the_policy_waits_stall_passes_again() -> None:
    policy = ConvergencePolicy(stall_passes=2, downtime_step_ms=200)
    samples = [sample(1, 900), sample(2, 300), sample(3, 300), sample(4, 300),  # step 1
               sample(5, 300),                                                 # waiting
               sample(6, 300)]                                                 # step 2
    state, actions = run(policy, samples)
    assert actions[3] == [SetDowntime(300)] and actions[4] == []
    assert actions[5] == [SetDowntime(500)]


def test_jumps_to_qemus_expected_downtime_when_it_fits_under_the_ceiling() -> None:
    policy = ConvergencePolicy(stall_passes=1, downtime_step_ms=100)
    _, actions = run(policy, [sample(1, 900), sample(2, 300),
                              sample(3, 300, expected_ms=700)])
    assert actions[-1] == [SetDowntime(840)]      # 700 ms + 20 % margin


def test_expected_downtime_beyond_the_ceiling_only_steps() -> None:
    policy = ConvergencePolicy(stall_passes=1, downtime_step_ms=100)
    _, actions = run(policy, [sample(1, 900), sample(2, 300),
                              sample(3, 300, expected_ms=9000)])
    assert actions[-1] == [SetDowntime(200)]


def test_ceiling_then_auto_converge() -> None:
    policy = ConvergencePolicy(max_downtime_ms=100, downtime_step_ms=400,
                               downtime_ceiling_ms=500, stall_passes=1,
                               auto_converge_after=100)
    samples = [sample(1, 900)] + [sample(n, 300) for n in range(2, 7)]
    state, actions = run(policy, samples)
    assert flat(actions) == [SetDowntime(500), EnableAutoConverge()]
    assert actions[3] == [EnableAutoConverge()]      # stalled again at the ceiling
    assert state.auto_converge and state.downtime_limit_ms == 500


def test_auto_converge_after_n_stalled_passes_below_the_ceiling() -> None:
    policy = ConvergencePolicy(stall_passes=2, downtime_step_ms=100,
                               downtime_ceiling_ms=2000, auto_converge_after=4)
    samples = [sample(1, 900)] + [sample(n, 300) for n in range(2, 7)]
    _, actions = run(policy, samples)
    # stalls at pass 4 (2 stalled passes) and pass 6 (4 in all: throttle too)
    assert actions[3] == [SetDowntime(200)]
    assert actions[5] == [SetDowntime(300), EnableAutoConverge()]


def test_auto_converge_none_never_throttles() -> None:
    policy = ConvergencePolicy(downtime_ceiling_ms=100, stall_passes=1,
                               auto_converge_after=None)
    samples = [sample(1, 900)] + [sample(n, 300) for n in range(2, 12)]
    assert flat(run(policy, samples)[1]) == []


def test_auto_converge_after_zero_starts_throttled() -> None:
    assert ConvergenceState.initial(ConvergencePolicy(auto_converge_after=0)).auto_converge


def test_postcopy_replaces_auto_converge_at_the_ceiling() -> None:
    policy = ConvergencePolicy(downtime_ceiling_ms=100, stall_passes=1, postcopy=True)
    samples = [sample(1, 900), sample(2, 300), sample(3, 300)]
    state, actions = run(policy, samples)
    assert flat(actions) == [StartPostcopy()]
    assert state.postcopy_started


def test_timeout_aborts_once_with_the_numbers() -> None:
    policy = ConvergencePolicy(completion_timeout_s=30)
    samples = [sample(1, 900, elapsed=10),
               sample(2, 300, elapsed=30.5, dirty_pages=25600, mbps=8 * 1.048576 * 50),
               sample(3, 300, elapsed=31)]
    state, actions = run(policy, samples)
    assert actions[0] == [] and actions[2] == []
    (abort,) = actions[1]
    assert isinstance(abort, Abort)
    assert "did not complete within 30 s" in abort.reason
    assert "300.0 MiB of 1024.0 MiB left" in abort.reason
    assert "dirtying 100.0 MiB/s" in abort.reason and "link 50.0 MiB/s" in abort.reason
    assert state.aborted


def test_never_aborts_in_postcopy() -> None:
    policy = ConvergencePolicy(completion_timeout_s=1, postcopy=True)
    _, actions = run(policy, [sample(5, 100, elapsed=99, status="postcopy-active")])
    assert flat(actions) == []


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled", "cancelling",
                                    "none"])
def test_finished_or_cancelling_gets_no_action(status: str) -> None:
    policy = ConvergencePolicy(completion_timeout_s=1)
    _, actions = run(policy, [sample(3, 100, elapsed=99, status=status)])
    assert flat(actions) == []


def test_invalid_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        ConvergencePolicy(max_downtime_ms=3000, downtime_ceiling_ms=2000)
    with pytest.raises(ValueError):
        ConvergencePolicy(stall_passes=0)
    with pytest.raises(ValueError):
        ConvergencePolicy(multifd_channels=2, postcopy=True)
    with pytest.raises(ValueError):
        ConvergencePolicy(bandwidth_bytes_per_s=0)


def test_sample_from_a_real_query_migrate_reply() -> None:
    reply = {"status": "active", "total-time": 1234, "setup-time": 7,
             "expected-downtime": 42,
             "ram": {"total": 201719808, "remaining": 1000000, "transferred": 5000000,
                     "dirty-pages-rate": 100, "dirty-sync-count": 3, "mbps": 800.5,
                     "page-size": 4096},
             "disk": {"total": 10, "remaining": 4}}
    s = MigrationSample.from_reply(reply)
    assert (s.elapsed_s, s.setup_time_ms, s.expected_downtime_ms) == (1.234, 7, 42)
    assert (s.ram_total, s.ram_remaining, s.ram_transferred) == (201719808, 1000000, 5000000)
    assert s.dirty_rate_bytes_per_s == 409600 and s.dirty_sync_count == 3
    assert (s.disk_total, s.disk_remaining) == (10, 4)
    assert MigrationSample.from_reply({"status": "setup"}).ram_total == 0


def test_eta() -> None:
    # 100 MiB left at 800 Mbit/s (100 MB/s) during the bulk pass
    s = sample(1, 100, mbps=800)
    assert eta_s(s) == pytest.approx(100 * MIB / 100e6)
    # later passes subtract the dirty rate: 100 MB/s - 50 MB/s
    s2 = MigrationSample(status="active", ram_total=MIB, ram_remaining=50_000_000, mbps=800,
                         dirty_sync_count=3, dirty_pages_rate=12207, page_size=4096)
    assert eta_s(s2) == pytest.approx(50_000_000 / (100e6 - 12207 * 4096))
    assert eta_s(sample(1, 100, mbps=0)) is None                  # no throughput yet
    assert eta_s(sample(3, 100, mbps=8, dirty_pages=10_000)) is None   # not converging
    assert eta_s(sample(3, 0, status="completed")) == 0.0
    assert eta_s(sample(3, 100, status="failed")) is None
