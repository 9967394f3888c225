import sqlite3
import subprocess
import sys

import pytest

from parvisor.errors import AlreadyExists, Busy, NotFound, StoreError
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition
from parvisor.store.base import Event
from parvisor.store.sqlite import SCHEMA_VERSION, SqliteStore

KERNEL = {"kind": "kernel", "kernel": "/k"}


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "p.db")
    yield s
    s.close()


def test_create_get_list_delete(store):
    record = store.create_vm(VmDefinition(name="a", boot=KERNEL))
    assert record.state == VmState.OFF and record.desired_state == "off"
    assert store.get_vm("a").uuid == record.uuid
    assert [r.name for r in store.list_vms()] == ["a"]
    store.delete_vm(record.uuid)
    with pytest.raises(NotFound):
        store.get_vm("a")


def test_duplicate_name_refused_and_nothing_changes(store):
    first = store.create_vm(VmDefinition(name="a", boot=KERNEL))
    with pytest.raises(AlreadyExists):
        store.create_vm(VmDefinition(name="a", boot=KERNEL, vcpus=2))
    assert store.list_vms() == [first]


def test_stale_generation_is_refused(store):
    record = store.create_vm(VmDefinition(name="a", boot=KERNEL))
    changed = record.definition.model_copy(update={"notes": "one"})
    store.update_definition(changed, record.generation)
    with pytest.raises(Busy):
        store.update_definition(record.definition.model_copy(update={"notes": "two"}),
                                record.generation)
    assert store.get_vm("a").definition.notes == "one"


def test_state_and_desired_state(store):
    record = store.create_vm(VmDefinition(name="a", boot=KERNEL))
    updated = store.set_state(record.uuid, VmState.STARTING, desired_state="running")
    assert (updated.state, updated.desired_state) == (VmState.STARTING, "running")
    updated = store.set_state(record.uuid, VmState.RUNNING, "ok")
    assert updated.desired_state == "running" and updated.generation > record.generation


def test_events_filtered_by_vm(store):
    store.append_event(Event("state", "a moved", vm_name="a"))
    store.append_event(Event("state", "b moved", vm_name="b"))
    assert [e.message for e in store.list_events("a")] == ["a moved"]
    assert len(store.list_events()) == 2


def test_reopen_keeps_data_and_schema_version(tmp_path):
    s = SqliteStore(tmp_path / "p.db")
    s.create_vm(VmDefinition(name="a", boot=KERNEL))
    s.close()
    again = SqliteStore(tmp_path / "p.db")
    assert [r.name for r in again.list_vms()] == ["a"]
    version = again._db.execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION
    again.close()


def test_newer_schema_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "p.db")
    db.execute("PRAGMA user_version=999")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(tmp_path / "p.db")


CHILD = """
import sys
from pathlib import Path
from parvisor.model.vm import VmDefinition
from parvisor.store.sqlite import SqliteStore
s = SqliteStore(Path(sys.argv[1]))
if sys.argv[2] == "create":
    s.create_vm(VmDefinition(name="new", boot={"kind": "kernel", "kernel": "/k"}))
else:
    s.delete_vm(s.get_vm("old").uuid)
print("survived")
"""


@pytest.mark.parametrize("point,operation,expect_new,expect_old", [
    ("create.before_commit", "create", False, True),
    ("create.after_commit", "create", True, True),
    ("delete.before_commit", "delete", False, True),
    ("delete.after_commit", "delete", False, False),
])
def test_sigkill_inside_a_write_leaves_old_or_new_never_half(tmp_path, point, operation,
                                                               expect_new, expect_old):
    path = tmp_path / "p.db"
    s = SqliteStore(path)
    s.create_vm(VmDefinition(name="old", boot=KERNEL))
    s.close()
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), operation],
                          env={"PARVISOR_CRASH_AT": point}, capture_output=True, text=True)
    assert done.returncode == -9 and "survived" not in done.stdout
    after = SqliteStore(path)
    names = {r.name for r in after.list_vms()}
    assert ("new" in names) == expect_new and ("old" in names) == expect_old
    assert after._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    after.close()
