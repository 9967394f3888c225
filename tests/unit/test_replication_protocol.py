"""The replication protocol: the record, its guarded states, the failover verdict and
what each side does with a record it finds (pure; no clock may be read)."""

from __future__ import annotations

import pytest

from parvisor.errors import InvalidInput, StateError
from parvisor.replication.protocol import (TRANSITIONS, InvalidTransition, LocalFacts,
                                           Mode, ReplicationRecord, State, Step,
                                           failover_verdict, format_point, may_run,
                                           next_step, parse_interval, protection,
                                           request_force)
from parvisor.testing.cluster_sim import no_wall_clock

GIB = 1 << 30


def rec(state=State.IN_SYNC, mode=Mode.SYNC, **kw) -> ReplicationRecord:
    kw.setdefault("last_consistent_at", 1000.0 if state != State.INITIAL_SYNC else None)
    return ReplicationRecord("u1", "db1", mode, "h1", "h2", state=state,
                             interval_s=30 if mode == Mode.ASYNC else 0,
                             disk_bytes=4 * GIB, **kw)


def test_json_round_trip_keeps_every_field_but_not_the_revision():
    record = rec(State.LAGGING, Mode.ASYNC, generation=3, bytes_behind=123, rpo_s=41.5,
                 export_uri="nbd:h2:10809:exportname=db1", force_failover=True,
                 revision=77)
    again = ReplicationRecord.from_json(record.to_json(), revision=78)
    assert again == ReplicationRecord(**{**record.__dict__, "revision": 78})
    assert '"revision"' not in record.to_json()
    assert '"state": "lagging"' in record.to_json()


def test_public_view_names_state_rpo_point_and_what_a_failover_would_cost():
    data = rec(State.IN_SYNC, revision=5).public()
    assert data["state"] == "in-sync" and data["mode"] == "sync"
    assert data["rpo_s"] == 0.0 and data["revision"] == 5
    assert "no acknowledged write lost" in data["failover"]
    broken = rec(State.BROKEN).public()
    assert broken["rpo_s"] is None and "refused unless forced" in broken["failover"]


@pytest.mark.parametrize("state", list(State))
def test_every_state_moves_only_where_the_table_allows(state):
    record = rec(state)
    for target in State:
        if target in TRANSITIONS[state]:
            assert record.to(target).state == target
        else:
            with pytest.raises(InvalidTransition) as err:
                record.to(target)
            assert isinstance(err.value, StateError)      # a 409 in the error tree
            assert err.value.details["current_state"] == state.value


def test_disabled_is_terminal_and_every_live_state_can_be_disabled():
    assert TRANSITIONS[State.DISABLED] == frozenset()
    live = set(State) - {State.DISABLING, State.DISABLED}
    assert all(State.DISABLING in TRANSITIONS[s] for s in live)


def test_failover_record_bumps_the_generation_and_swaps_the_roles():
    record = rec(State.BROKEN, generation=4, force_failover=True, revision=9)
    after = record.failed_over("failover from h1")
    assert (after.primary, after.replica, after.generation) == ("h2", "h1", 5)
    assert after.state == State.FAILED_OVER and not after.force_failover
    assert not may_run(after, "h1") and may_run(after, "h2")


def test_reverse_resyncs_to_the_chosen_replica_keeping_the_generation():
    after = rec(State.IN_SYNC).failed_over("x")
    back = after.reversed_to("h1", incremental=True)
    assert (back.state, back.replica, back.full_resync) == (State.RESYNCING, "h1", False)
    assert back.generation == after.generation
    assert after.reversed_to("h3", incremental=False).full_resync


def test_only_the_newest_generations_primary_may_run_the_vm():
    assert may_run(None, "h9")                       # not replicated
    assert may_run(rec(), "h1") and not may_run(rec(), "h2")
    assert may_run(rec(State.DISABLED), "h2")        # replication gone: owner decides


# --- failover verdicts ---------------------------------------------------------------
def test_sync_in_sync_fails_over_without_loss():
    verdict = failover_verdict(rec(State.IN_SYNC))
    assert verdict.allowed and not verdict.forced
    assert "no acknowledged write lost" in verdict.reason


@pytest.mark.parametrize("state", [State.IN_SYNC, State.LAGGING])
def test_async_fails_over_to_the_last_consistent_point_and_says_what_is_lost(state):
    verdict = failover_verdict(rec(state, Mode.ASYNC, last_consistent_at=30.0, rpo_s=75.0))
    assert verdict.allowed
    assert "last consistent point t=30.00" in verdict.reason
    assert "writes after it are lost" in verdict.reason
    if state == State.LAGGING:
        assert "75 s behind" in verdict.reason


def test_broken_is_refused_with_the_risk_then_allowed_when_forced():
    refused = failover_verdict(rec(State.BROKEN, last_consistent_at=5.0))
    assert not refused.allowed
    assert "lose every write after it" in refused.reason and "--force" in refused.reason
    forced = failover_verdict(request_force(rec(State.BROKEN, last_consistent_at=5.0)))
    assert forced.allowed and forced.forced and forced.reason.startswith("FORCED")


def test_sync_lagging_needs_force_like_broken():
    assert not failover_verdict(rec(State.LAGGING, Mode.SYNC)).allowed


@pytest.mark.parametrize("state,why", [
    (State.ENABLING, "initial sync"), (State.INITIAL_SYNC, "initial sync"),
    (State.RESYNCING, "mid-resync"), (State.FAILED_OVER, "no replica since the failover"),
    (State.DISABLING, "being disabled")])
def test_no_usable_copy_is_refused_even_when_forced(state, why):
    record = rec(state, force_failover=True)
    verdict = failover_verdict(record)
    assert not verdict.allowed and why in verdict.reason


def test_initial_sync_progress_is_in_the_refusal():
    record = rec(State.INITIAL_SYNC, bytes_done=GIB)
    assert "(25% copied)" in failover_verdict(record).reason


def test_broken_before_the_first_full_copy_is_refused_even_forced():
    record = rec(State.BROKEN, last_consistent_at=None, force_failover=True)
    assert "never held a complete copy" in failover_verdict(record).reason


def test_force_is_refused_where_it_is_not_needed_or_cannot_help():
    with pytest.raises(StateError, match="not needed"):
        request_force(rec(State.IN_SYNC))
    with pytest.raises(StateError, match="initial sync"):
        request_force(rec(State.INITIAL_SYNC))
    assert request_force(rec(State.BROKEN)).force_failover


# --- next_step -----------------------------------------------------------------------
FAILED = rec(State.IN_SYNC).failed_over("failover from h1")


def primary(**kw) -> LocalFacts:
    kw.setdefault("has_vm", True)
    return LocalFacts("h1", **kw)


def replica(**kw) -> LocalFacts:
    return LocalFacts("h2", **kw)


@pytest.mark.parametrize("record,facts,step", [
    (rec(State.ENABLING), replica(), Step.PREPARE_TARGET),
    (rec(State.ENABLING), primary(), Step.NOTHING),
    (rec(State.INITIAL_SYNC), primary(), Step.START_COPY),
    (rec(State.INITIAL_SYNC), primary(working=True), Step.NOTHING),
    (rec(State.INITIAL_SYNC), replica(), Step.SERVE_TARGET),
    (rec(State.IN_SYNC), primary(), Step.ENSURE_MIRROR),
    # sync: a short stall changes nothing; past the limit: commit broken first
    (rec(State.IN_SYNC), primary(peer_unreachable_s=4.9), Step.ENSURE_MIRROR),
    (rec(State.IN_SYNC), primary(peer_unreachable_s=5.0), Step.MARK_BROKEN),
    (rec(State.IN_SYNC), primary(peer_is_member=False), Step.MARK_BROKEN),
    (rec(State.IN_SYNC, Mode.ASYNC), primary(), Step.NOTHING),
    (rec(State.IN_SYNC, Mode.ASYNC), primary(cycle_due=True), Step.SHIP_CHANGES),
    (rec(State.IN_SYNC, Mode.ASYNC), primary(cycle_due=True, peer_unreachable_s=1),
     Step.MARK_LAGGING),
    (rec(State.LAGGING, Mode.ASYNC), primary(cycle_due=True, peer_unreachable_s=1),
     Step.NOTHING),
    (rec(State.LAGGING, Mode.ASYNC), primary(cycle_due=True), Step.SHIP_CHANGES),
    (rec(State.BROKEN), primary(peer_unreachable_s=9), Step.NOTHING),
    (rec(State.BROKEN), primary(), Step.START_RESYNC),
    (rec(State.RESYNCING), primary(), Step.START_RESYNC),      # restarted mid-resync
    (rec(State.RESYNCING), replica(), Step.SERVE_TARGET),
    (rec(State.IN_SYNC), primary(has_vm=False), Step.NOTHING),
    # a replica host that runs the VM: the stale copy goes, whatever else is going on
    (rec(State.IN_SYNC), replica(has_vm=True, working=True), Step.STOP_STALE_COPY),
    # after a failover: the new primary waits for the manager to pick a replica; the
    # returning old primary's copy must not run
    (FAILED, LocalFacts("h2", has_vm=True), Step.NOTHING),
    (FAILED, LocalFacts("h1", has_vm=True), Step.STOP_STALE_COPY),
    (FAILED, LocalFacts("h1"), Step.NOTHING),
    (rec(State.DISABLING), primary(), Step.STOP_JOBS),
    (rec(State.DISABLING, primary_stopped=True), primary(), Step.NOTHING),
    (rec(State.DISABLING), replica(), Step.NOTHING),
    (rec(State.DISABLING, primary_stopped=True), replica(), Step.DROP_REPLICA),
    (rec(State.DISABLING), replica(peer_is_member=False), Step.DROP_REPLICA),
    (rec(State.DISABLED), primary(has_vm=False), Step.DELETE_RECORD),
    (rec(State.IN_SYNC), LocalFacts("h3"), Step.NOTHING),
])
def test_next_step(record, facts, step):
    with no_wall_clock():
        assert next_step(record, facts) == step


def test_intervals_are_hyper_v_replicas_three():
    assert [parse_interval(t) for t in ("30s", "5m", "15m")] == [30, 300, 900]
    with pytest.raises(InvalidInput, match="not one of 30s, 5m, 15m"):
        parse_interval("1m")


def test_points_read_as_simulator_time_or_utc():
    assert format_point(None) == "never"
    assert format_point(30.0) == "t=30.00"
    assert format_point(1_790_000_000.0) == "2026-09-21T14:13:20Z"


def test_protection_wording_counts_replication_only_when_a_failover_would_happen():
    assert protection(False, True, None) == "not HA"
    assert protection(True, True, None) == "protected"
    assert protection(True, False, None) == "not protected: disks on local storage"
    assert protection(True, False, rec(State.DISABLED)) == \
        "not protected: disks on local storage"
    assert protection(True, False, rec()) == "protected by sync replication to h2 (in-sync)"
    assert protection(True, False, rec(State.LAGGING, Mode.ASYNC)) == \
        "protected by async replication to h2 (lagging, every 30 s)"
    assert protection(True, False, rec(State.INITIAL_SYNC)).startswith(
        "not protected: replica on h2 is still in its initial sync")
    broken = protection(True, False, rec(State.BROKEN, force_failover=True))
    assert broken.startswith("at risk: FORCED by the user: replica on h2 is broken")
    assert protection(True, False, rec(State.BROKEN)).endswith("refused unless forced "
                                                               "(replication failover --force)")
