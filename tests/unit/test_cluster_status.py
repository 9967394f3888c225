"""``cluster status`` names the witness: an etcd member that runs on no host."""

from __future__ import annotations

from parvisor.cluster.env import HostRecord
from parvisor.cluster.status import mark_witnesses


def _member(name: str, ip: str) -> dict:
    return {"name": name, "client_urls": [f"https://{ip}:2379"], "voter": True}


def _host(name: str, ip: str | None) -> HostRecord:
    return HostRecord(name, 1 << 30, 2, api_url=f"https://{ip}:8444" if ip else "")


def test_members_named_m1_m2_are_told_apart_by_address():
    members = [_member("m1", "10.0.0.1"), _member("m2", "10.0.0.2"), _member("m3", "10.0.0.3")]
    mark_witnesses(members, [_host("a", "10.0.0.1"), _host("b", "10.0.0.2")])
    assert [m["witness"] for m in members] == [False, False, True]


def test_the_labs_members_carry_host_names():
    members = [_member("h1", "10.1.0.1"), _member("h2", "10.1.0.2"), _member("w", "10.1.0.9")]
    mark_witnesses(members, [_host("h1", "10.1.0.1"), _host("h2", "10.1.0.2")])
    assert [m["witness"] for m in members] == [False, False, True]


def test_the_migration_address_counts_when_there_is_no_cluster_api():
    host = HostRecord("a", 1 << 30, 2, migration={"migration_address": "10.0.0.1"})
    members = [_member("m1", "10.0.0.1"), _member("m2", "10.0.0.7")]
    mark_witnesses(members, [host])
    assert [m["witness"] for m in members] == [False, True]


def test_unknown_when_a_host_published_no_address():
    members = [_member("h1", "10.0.0.1"), _member("m9", "10.0.0.9")]
    mark_witnesses(members, [_host("h1", "10.0.0.1"), _host("b", None)])
    assert [m["witness"] for m in members] == [False, None]   # named after a host: known
