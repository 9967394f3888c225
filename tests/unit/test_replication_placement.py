"""Where a replica goes, and which enable/disable requests are refused (pure)."""

from __future__ import annotations

import pytest

from parvisor.errors import AlreadyExists, InvalidInput, NotFound
from parvisor.replication.placement import (NoReplicaHost, ReplicaCandidate,
                                            choose_replica, disable_request,
                                            enable_request)
from parvisor.replication.protocol import Mode, ReplicationRecord, State

GIB = 1 << 30


def c(name, free=100, site="", **kw) -> ReplicaCandidate:
    return ReplicaCandidate(name, site=site, free_bytes=free * GIB, **kw)


HOSTS = [c("h1", 50, "a"), c("h2", 90, "a"), c("h3", 20, "b"), c("h4", 30, "b")]


def test_another_site_first_then_most_free_space():
    assert choose_replica("h1", 10 * GIB, HOSTS).host == "h4"      # b, most free
    assert choose_replica("h3", 10 * GIB, HOSTS).host == "h2"      # a, most free


def test_without_sites_the_host_with_most_free_space_never_the_primary():
    hosts = [c("h1", 500), c("h2", 90), c("h3", 95)]
    assert choose_replica("h1", 10 * GIB, hosts).host == "h3"


def test_no_room_in_the_other_site_keeps_it_in_this_one_and_says_so():
    choice = choose_replica("h1", 25 * GIB, [c("h1", 50, "a"), c("h2", 90, "a"),
                                              c("h3", 20, "b")])
    assert choice.host == "h2"
    assert "stays in site a" in choice.note


def test_no_host_can_hold_it_names_each_refusal():
    hosts = [c("h1", 500), c("h2", 1), c("h3", member=False),
             ReplicaCandidate("h4"), c("h5", maintenance=True), c("h6", quarantined=True)]
    with pytest.raises(NoReplicaHost) as err:
        choose_replica("h1", 10 * GIB, hosts)
    refusals = err.value.details["refusals"]
    assert "same host" in refusals["h1"]
    assert refusals["h2"] == "no room: needs 10240 MiB, has 1024 MiB free"
    assert refusals["h3"] == "not a member"
    assert "not published" in refusals["h4"]
    assert refusals["h5"] == "in maintenance" and refusals["h6"] == "quarantined"


def test_a_single_host_cluster_has_nowhere_for_a_replica():
    with pytest.raises(NoReplicaHost, match="h1: it is the primary"):
        choose_replica("h1", GIB, [c("h1")])


def test_the_users_pick_is_checked_not_second_guessed():
    assert choose_replica("h1", GIB, HOSTS, to="h2").host == "h2"   # same site: asked
    with pytest.raises(InvalidInput, match="the VM's own host"):
        choose_replica("h1", GIB, HOSTS, to="h1")
    with pytest.raises(InvalidInput, match="replica host h3: no room"):
        choose_replica("h1", 25 * GIB, HOSTS, to="h3")
    with pytest.raises(NotFound, match="no cluster host named 'h9'"):
        choose_replica("h1", GIB, HOSTS, to="h9")


def enable(**kw):
    args = dict(mode="sync", interval=None, disk_bytes=4 * GIB, shared_disks=[],
                existing=None, hosts=HOSTS)
    args.update(kw)
    return enable_request("u1", "db1", "h1", **args)


def test_enable_writes_an_enabling_record_of_generation_one():
    record, note = enable()
    assert (record.primary, record.replica, record.state) == ("h1", "h4", State.ENABLING)
    assert record.mode == Mode.SYNC and record.interval_s == 0 and record.generation == 1
    assert record.disk_bytes == 4 * GIB and note == ""


def test_async_interval_defaults_to_five_minutes():
    assert enable(mode="async")[0].interval_s == 300
    assert enable(mode="async", interval="30s")[0].interval_s == 30


@pytest.mark.parametrize("kw,error,match", [
    (dict(mode="semi"), InvalidInput, "not sync or async"),
    (dict(interval="30s"), InvalidInput, "for async replication"),
    (dict(mode="async", interval="2m"), InvalidInput, "not one of"),
    (dict(shared_disks=["quorum"]), InvalidInput, "shared .guest-cluster. disks quorum"),
    (dict(to="h1"), InvalidInput, "own host"),
    (dict(disk_bytes=200 * GIB), NoReplicaHost, "no room"),
])
def test_enable_refusals(kw, error, match):
    with pytest.raises(error, match=match):
        enable(**kw)


def test_enabling_twice_is_refused_but_after_a_disable_it_is_a_new_generation():
    record, _ = enable()
    with pytest.raises(AlreadyExists, match="already enabled .sync to h4, enabling"):
        enable(existing=record)
    again, _ = enable(existing=ReplicationRecord(**{**record.__dict__,
                                                    "state": State.DISABLED}))
    assert again.generation == 2


def test_disable_during_initial_sync_cancels_it_and_the_vm_runs_on():
    record = enable()[0].to(State.INITIAL_SYNC)
    after, note = disable_request(record)
    assert after.state == State.DISABLING
    assert "initial sync cancelled" in note and "keeps running" in note


def test_disable_in_sync_says_the_vm_is_unprotected_and_twice_is_refused():
    record = enable()[0].to(State.INITIAL_SYNC).to(State.IN_SYNC)
    after, note = disable_request(record)
    assert "unprotected" in note
    with pytest.raises(AlreadyExists, match="already being disabled"):
        disable_request(after)
