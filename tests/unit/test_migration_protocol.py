"""The live-migration protocol's pure parts: guarded phase moves, the record's JSON
round trip, and what each side does with a record it finds, in particular after a
restart at every phase (INV-4/INV-5: before the switch the source keeps the VM, after
it the destination does; nobody resumes a copy that lost)."""

from __future__ import annotations

import pytest

from parvisor.errors import StateError
from parvisor.migration.protocol import (AFTER_SWITCH, BEFORE_SWITCH, LocalFacts,
                                         MigrationOptions, MigrationRecord, Phase, Step,
                                         TRANSITIONS, next_step)

P = Phase


def record(phase: Phase = P.REQUESTED, **changes) -> MigrationRecord:
    base = MigrationRecord(vm_uuid="u1", vm_name="web", source="h1", destination="h2",
                           phase=phase, owner_revision=7,
                           options=MigrationOptions(with_storage=True, max_downtime_ms=50))
    return base if not changes else MigrationRecord(**{**base.__dict__, **changes})


def facts(host: str, *, working: bool = False, has_copy: bool = False,
          peer: bool = True) -> LocalFacts:
    return LocalFacts(host, working=working, has_copy=has_copy, peer_is_member=peer)


def test_json_round_trip_keeps_every_field():
    original = record(P.PERFORMING, progress={"ram_remaining": 5}, dest_disks={"d0": "/x"},
                      cancel_requested=True, revision=0)
    again = MigrationRecord.from_json(original.to_json(), revision=42)
    assert again.revision == 42
    assert again.phase is P.PERFORMING and again.options.max_downtime_ms == 50
    assert again.to_json() == original.to_json()


def test_only_listed_moves_are_allowed():
    assert record().to(P.PREPARING).phase is P.PREPARING
    with pytest.raises(StateError, match="requested"):
        record().to(P.SWITCHED)             # never switch without a prepared destination
    with pytest.raises(StateError):
        record(P.SWITCHED).to(P.ABORTING)   # after the switch there is no way back
    for phase in AFTER_SWITCH:
        assert not TRANSITIONS[phase] & {P.ABORTING, P.FAILED, P.CANCELLED}


def test_no_step_for_an_uninvolved_host_or_a_busy_task():
    assert next_step(record(), facts("h3")) is Step.NOTHING
    assert next_step(record(), facts("h1", working=True)) is Step.NOTHING


def test_fresh_request_source_checks_destination_prepares():
    assert next_step(record(), facts("h1")) is Step.CHECK_AND_PREPARE
    assert next_step(record(), facts("h2")) is Step.NOTHING
    assert next_step(record(P.PREPARING), facts("h2")) is Step.PREPARE_INCOMING


@pytest.mark.parametrize("phase", sorted(BEFORE_SWITCH - {P.REQUESTED}))
def test_source_restarted_before_the_switch_recovers_its_vm(phase):
    # no task of this (new) service holds the record: resume the source and abort
    assert next_step(record(phase), facts("h1", has_copy=True)) is Step.RECOVER_SOURCE


@pytest.mark.parametrize("phase", [P.PREPARING, P.PREPARED, P.PERFORMING])
def test_destination_restarted_with_a_copy_before_the_switch_aborts(phase):
    assert next_step(record(phase), facts("h2", has_copy=True)) is Step.ABORT_INCOMING


@pytest.mark.parametrize("phase", [P.SWITCHED, P.FINISHED])
def test_source_after_the_switch_only_drops_its_copy(phase):
    assert next_step(record(phase), facts("h1", has_copy=True)) is Step.DROP_SOURCE_COPY


def test_destination_resumes_only_after_the_switch():
    assert next_step(record(P.SWITCHED), facts("h2", has_copy=True)) is Step.RESUME_INCOMING
    for phase in BEFORE_SWITCH:
        assert next_step(record(phase), facts("h2", has_copy=True)) is not \
            Step.RESUME_INCOMING


def test_abort_is_finalised_by_the_source_when_the_destination_is_gone():
    assert next_step(record(P.ABORTING), facts("h1", peer=True)) is Step.NOTHING
    assert next_step(record(P.ABORTING), facts("h1", peer=False)) is Step.FINALISE_ABORT
    assert next_step(record(P.ABORTING), facts("h2")) is Step.ABORT_INCOMING


def test_destination_back_after_a_finalised_abort_cleans_once():
    failed = record(P.FAILED, dest_cleaned=False)
    assert next_step(failed, facts("h2")) is Step.ABORT_INCOMING
    assert next_step(record(P.FAILED, dest_cleaned=True), facts("h2")) is Step.NOTHING
    assert next_step(record(P.COMPLETED), facts("h2")) is Step.NOTHING
