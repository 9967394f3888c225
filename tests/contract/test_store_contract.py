"""One set of store tests, run against every Store implementation: SqliteStore (the
standalone default) and EtcdStore (cluster), the latter on a real etcd member that the
fixture starts on 127.0.0.1 with free ports and a tmp data dir and stops by PID."""

from __future__ import annotations

import uuid

import pytest

from parvisor.errors import AlreadyExists, Busy, NotFound
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition
from parvisor.store.base import Event
from parvisor.store.etcd import EtcdStore
from parvisor.store.sqlite import SqliteStore

KERNEL = {"kind": "kernel", "kernel": "/k"}




@pytest.fixture(params=["sqlite", "etcd"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "p.db")
    else:   # a fresh cluster prefix per test: tests cannot see each other's keys
        s = EtcdStore(request.getfixturevalue("etcd").kv(), f"c{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


def vm(name: str = "a", **kw) -> VmDefinition:
    return VmDefinition(name=name, boot=KERNEL, **kw)


def test_create_get_list_delete(store):
    record = store.create_vm(vm("a"))
    assert record.state == VmState.OFF and record.desired_state == "off"
    assert store.get_vm("a") == record
    assert store.get_vm_by_uuid(record.uuid) == record
    assert [r.name for r in store.list_vms()] == ["a"]
    store.delete_vm(record.uuid)
    with pytest.raises(NotFound):
        store.get_vm("a")
    assert store.list_vms() == []


def test_list_is_sorted_by_name(store):
    for name in ("c", "a", "b"):
        store.create_vm(vm(name))
    assert [r.name for r in store.list_vms()] == ["a", "b", "c"]


def test_duplicate_name_refused_and_nothing_changes(store):
    first = store.create_vm(vm("a"))
    with pytest.raises(AlreadyExists):
        store.create_vm(vm("a", vcpus=2))
    assert store.list_vms() == [first]


def test_unknown_vm_is_not_found(store):
    with pytest.raises(NotFound):
        store.get_vm("nope")
    with pytest.raises(NotFound):
        store.get_vm_by_uuid(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        store.set_state(str(uuid.uuid4()), VmState.RUNNING)


def test_update_needs_the_generation_read(store):
    record = store.create_vm(vm("a"))
    updated = store.update_definition(record.definition.model_copy(update={"vcpus": 2}),
                                      record.generation)
    assert updated.definition.vcpus == 2 and updated.generation != record.generation
    with pytest.raises(Busy):    # stale generation: someone else wrote in between
        store.update_definition(record.definition.model_copy(update={"vcpus": 3}),
                                record.generation)
    assert store.get_vm("a").definition.vcpus == 2


def test_rename_moves_the_name_and_refuses_a_clash(store):
    a = store.create_vm(vm("a"))
    store.create_vm(vm("b"))
    with pytest.raises(AlreadyExists):
        store.update_definition(a.definition.model_copy(update={"name": "b"}), a.generation)
    renamed = store.update_definition(a.definition.model_copy(update={"name": "c"}),
                                      a.generation)
    assert store.get_vm("c").uuid == renamed.uuid
    with pytest.raises(NotFound):
        store.get_vm("a")


def test_set_state_bumps_generation_and_keeps_desired(store):
    record = store.create_vm(vm("a"))
    running = store.set_state(record.uuid, VmState.STARTING, "start", desired_state="running")
    assert running.desired_state == "running" and running.generation != record.generation
    crashed = store.set_state(record.uuid, VmState.CRASHED, "QEMU exited")
    assert (crashed.state, crashed.state_reason, crashed.desired_state) == (
        VmState.CRASHED, "QEMU exited", "running")


def test_switches(store):
    store.put_switch("lan", {"name": "lan", "kind": "internal"}, create=True)
    with pytest.raises(AlreadyExists):
        store.put_switch("lan", {"name": "lan"}, create=True)
    with pytest.raises(NotFound):
        store.put_switch("wan", {"name": "wan"}, create=False)
    store.put_switch("lan", {"name": "lan", "kind": "private"}, create=False)
    store.put_switch("dmz", {"name": "dmz"}, create=True)
    assert store.get_switch("lan")["kind"] == "private"
    assert [s["name"] for s in store.list_switches()] == ["dmz", "lan"]
    store.delete_switch("lan")
    with pytest.raises(NotFound):
        store.delete_switch("lan")
    with pytest.raises(NotFound):
        store.get_switch("lan")


def test_events_in_order_filtered_and_limited(store):
    for i in range(5):
        store.append_event(Event("state", f"m{i}", vm_name="a" if i % 2 else "b"))
    events = store.list_events()
    assert [e.message for e in events] == ["m0", "m1", "m2", "m3", "m4"]
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert [e.message for e in store.list_events("a")] == ["m1", "m3"]
    assert [e.message for e in store.list_events(limit=2)] == ["m3", "m4"]


def test_etcd_keeps_a_window_of_the_newest_events_and_reads_newest_first(etcd, monkeypatch):
    """The event log must not grow without bound in etcd (every host's agent reads the
    cluster keys 4x/s; events are left out of that read, and old ones are trimmed)."""
    import parvisor.store.etcd as etcd_store
    from parvisor.store.base import Event
    monkeypatch.setattr(etcd_store, "EVENTS_KEPT", 5)
    store = EtcdStore(etcd.kv(), f"c{uuid.uuid4().hex[:8]}")
    for i in range(1, 9):
        store.append_event(Event("test", f"event {i}", "a" if i % 2 else "b", None, {}))
    assert [e.message for e in store.list_events(limit=200)] == \
        [f"event {i}" for i in range(4, 9)]                       # 1-3 trimmed
    assert [e.message for e in store.list_events(limit=2)] == ["event 7", "event 8"]
    assert [e.message for e in store.list_events("a")] == ["event 5", "event 7"]
    items, _ = store.kv.get_prefix(store.keys.under("event"))
    assert len(items) == 5
