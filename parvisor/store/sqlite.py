"""SQLite store for a standalone host (the embedded default).

Durability: WAL journal with ``synchronous=FULL``, one transaction per write, so a
write that returned survives SIGKILL and power loss. Schema changes are numbered
migrations applied in order; ``PRAGMA user_version`` records the one in force.
This module must never do anything but keep records: no QEMU, no files of VMs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from parvisor.errors import AlreadyExists, Busy, NotFound, StoreError
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition, upgrade_definition
from parvisor.store.base import Event, VmRecord
from parvisor.testing.crashpoints import crashpoint

MIGRATIONS: list[str] = [
    # 1: first schema
    """
    CREATE TABLE vms (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        state TEXT NOT NULL,
        state_reason TEXT NOT NULL DEFAULT '',
        desired_state TEXT NOT NULL DEFAULT 'off',
        generation INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        timestamp REAL NOT NULL,
        kind TEXT NOT NULL,
        vm_name TEXT,
        vm_uuid TEXT,
        message TEXT NOT NULL,
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_vm ON events (vm_name, id);
    """,
    # 2: virtual switches (definitions as versioned JSON documents, like VMs)
    """
    CREATE TABLE switches (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL
    );
    """,
    # 3: checkpoints (versioned JSON documents, parvisor.model.checkpoint) and each
    # VM's current checkpoint (the one its present state descends from)
    """
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        vm_uuid TEXT NOT NULL,
        name TEXT NOT NULL,
        document TEXT NOT NULL,
        UNIQUE (vm_uuid, name)
    );
    CREATE TABLE checkpoint_current (
        vm_uuid TEXT PRIMARY KEY,
        checkpoint_id TEXT NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
MAX_EVENTS = 20000  # older events are trimmed so the log cannot fill the state disk


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}", path=str(path)) from exc
        self._lock = threading.Lock()
        self._migrate()

    # --- plumbing -------------------------------------------------------------------
    @contextmanager
    def _tx(self, point: str | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                if point:
                    crashpoint(f"{point}.before_commit")
                self._db.execute("COMMIT")
                if point:
                    crashpoint(f"{point}.after_commit")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store write failed: {exc}") from exc
                raise

    def _migrate(self) -> None:
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(f"store schema {current} is newer than this parvisor "
                             f"({SCHEMA_VERSION}); refusing to touch it", path=str(self.path))
        for version in range(current, SCHEMA_VERSION):
            with self._tx() as db:
                # executescript() would commit on its own; run statement by statement
                # so a migration and its version bump land in one transaction.
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={version + 1}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _record(row: tuple) -> VmRecord:
        definition_json, state, reason, desired, generation = row
        data = upgrade_definition(json.loads(definition_json))
        return VmRecord(VmDefinition.model_validate(data), VmState(state), reason, desired,
                        generation)

    _COLUMNS = "definition, state, state_reason, desired_state, generation"

    # --- VMs ------------------------------------------------------------------------
    def create_vm(self, definition: VmDefinition) -> VmRecord:
        with self._tx("create") as db:
            if db.execute("SELECT 1 FROM vms WHERE name=?", (definition.name,)).fetchone():
                raise AlreadyExists(f"a VM named '{definition.name}' already exists",
                                    name=definition.name)
            db.execute("INSERT INTO vms (uuid, name, definition, state) VALUES (?,?,?,?)",
                       (definition.uuid, definition.name, definition.model_dump_json(),
                        VmState.OFF.value))
        return VmRecord(definition, VmState.OFF, "", "off", 1)

    def get_vm(self, name: str) -> VmRecord:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM vms WHERE name=?",
                               (name,)).fetchone()
        if row is None:
            raise NotFound(f"no VM named '{name}'", name=name)
        return self._record(row)

    def get_vm_by_uuid(self, vm_uuid: str) -> VmRecord:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM vms WHERE uuid=?",
                               (vm_uuid,)).fetchone()
        if row is None:
            raise NotFound(f"no VM with uuid {vm_uuid}", uuid=vm_uuid)
        return self._record(row)

    def list_vms(self) -> list[VmRecord]:
        rows = self._db.execute(f"SELECT {self._COLUMNS} FROM vms ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def update_definition(self, definition: VmDefinition, generation: int) -> VmRecord:
        with self._tx("update") as db:
            row = db.execute("SELECT name, generation FROM vms WHERE uuid=?",
                             (definition.uuid,)).fetchone()
            if row is None:
                raise NotFound(f"no VM named '{definition.name}'", name=definition.name)
            if row[1] != generation:
                raise Busy(f"VM '{row[0]}' was changed by another request; read it again",
                           name=row[0])
            clash = db.execute("SELECT 1 FROM vms WHERE name=? AND uuid<>?",
                               (definition.name, definition.uuid)).fetchone()
            if clash:
                raise AlreadyExists(f"a VM named '{definition.name}' already exists",
                                    name=definition.name)
            db.execute("UPDATE vms SET name=?, definition=?, generation=generation+1 "
                       "WHERE uuid=?", (definition.name, definition.model_dump_json(),
                                        definition.uuid))
        return self.get_vm_by_uuid(definition.uuid)

    def set_state(self, vm_uuid: str, state: VmState, reason: str = "", *,
                  desired_state: str | None = None) -> VmRecord:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE vms SET state=?, state_reason=?, generation=generation+1,"
                " desired_state=COALESCE(?, desired_state) WHERE uuid=?",
                (state.value, reason, desired_state, vm_uuid))
            if cursor.rowcount == 0:
                raise NotFound(f"no VM with uuid {vm_uuid}", uuid=vm_uuid)
        return self.get_vm_by_uuid(vm_uuid)

    def delete_vm(self, vm_uuid: str) -> None:
        with self._tx("delete") as db:
            db.execute("DELETE FROM vms WHERE uuid=?", (vm_uuid,))
            db.execute("DELETE FROM checkpoints WHERE vm_uuid=?", (vm_uuid,))
            db.execute("DELETE FROM checkpoint_current WHERE vm_uuid=?", (vm_uuid,))

    # --- switches (documents owned by parvisor.switch; the store only keeps them) --------
    def put_switch(self, name: str, document: dict, *, create: bool) -> None:
        with self._tx("switch") as db:
            exists = db.execute("SELECT 1 FROM switches WHERE name=?", (name,)).fetchone()
            if create and exists:
                raise AlreadyExists(f"a switch named '{name}' already exists", name=name)
            if not create and not exists:
                raise NotFound(f"no switch named '{name}'", name=name)
            db.execute("INSERT OR REPLACE INTO switches (name, definition) VALUES (?,?)",
                       (name, json.dumps(document, sort_keys=True)))

    def get_switch(self, name: str) -> dict:
        row = self._db.execute("SELECT definition FROM switches WHERE name=?",
                               (name,)).fetchone()
        if row is None:
            raise NotFound(f"no switch named '{name}'", name=name)
        return json.loads(row[0])

    def list_switches(self) -> list[dict]:
        rows = self._db.execute("SELECT definition FROM switches ORDER BY name").fetchall()
        return [json.loads(row[0]) for row in rows]

    def delete_switch(self, name: str) -> None:
        with self._tx("switch") as db:
            if db.execute("DELETE FROM switches WHERE name=?", (name,)).rowcount == 0:
                raise NotFound(f"no switch named '{name}'", name=name)

    # --- checkpoints (documents owned by parvisor.ops.checkpoints) -----------------------
    def put_checkpoint(self, document: dict, *, create: bool,
                       make_current: bool = False) -> None:
        vm_uuid, checkpoint_id, name = document["vm_uuid"], document["id"], document["name"]
        with self._tx("checkpoint") as db:
            row = db.execute("SELECT vm_uuid FROM checkpoints WHERE id=?",
                             (checkpoint_id,)).fetchone()
            if create and row:
                raise AlreadyExists(f"checkpoint id {checkpoint_id} already exists")
            if not create and (row is None or row[0] != vm_uuid):
                raise NotFound(f"no checkpoint {name!r} of this VM", name=name)
            if db.execute("SELECT 1 FROM checkpoints WHERE vm_uuid=? AND name=? AND id<>?",
                          (vm_uuid, name, checkpoint_id)).fetchone():
                raise AlreadyExists(f"the VM already has a checkpoint named {name!r}",
                                    name=name)
            db.execute("INSERT OR REPLACE INTO checkpoints (id, vm_uuid, name, document) "
                       "VALUES (?,?,?,?)", (checkpoint_id, vm_uuid, name,
                                            json.dumps(document, sort_keys=True)))
            if make_current:
                db.execute("INSERT OR REPLACE INTO checkpoint_current (vm_uuid, "
                           "checkpoint_id) VALUES (?,?)", (vm_uuid, checkpoint_id))

    def list_checkpoints(self, vm_uuid: str) -> list[dict]:
        rows = self._db.execute("SELECT document FROM checkpoints WHERE vm_uuid=?",
                                (vm_uuid,)).fetchall()
        # oldest first (REPLACE renumbers rowids, so order by the recorded time)
        return sorted((json.loads(row[0]) for row in rows),
                      key=lambda d: (d.get("created", 0), d["id"]))

    def current_checkpoint(self, vm_uuid: str) -> str | None:
        row = self._db.execute("SELECT checkpoint_id FROM checkpoint_current WHERE "
                               "vm_uuid=?", (vm_uuid,)).fetchone()
        return row[0] if row else None

    def delete_checkpoint(self, vm_uuid: str, checkpoint_id: str) -> None:
        with self._tx("checkpoint") as db:
            row = db.execute("SELECT document FROM checkpoints WHERE id=? AND vm_uuid=?",
                             (checkpoint_id, vm_uuid)).fetchone()
            if row is None:
                raise NotFound(f"no checkpoint {checkpoint_id} of this VM")
            parent = json.loads(row[0]).get("parent")
            for (child_id, child_json) in db.execute(
                    "SELECT id, document FROM checkpoints WHERE vm_uuid=?",
                    (vm_uuid,)).fetchall():
                child = json.loads(child_json)
                if child.get("parent") == checkpoint_id:
                    child["parent"] = parent
                    db.execute("UPDATE checkpoints SET document=? WHERE id=?",
                               (json.dumps(child, sort_keys=True), child_id))
            db.execute("DELETE FROM checkpoints WHERE id=?", (checkpoint_id,))
            if parent is None:
                db.execute("DELETE FROM checkpoint_current WHERE vm_uuid=? AND "
                           "checkpoint_id=?", (vm_uuid, checkpoint_id))
            else:
                db.execute("UPDATE checkpoint_current SET checkpoint_id=? WHERE vm_uuid=? "
                           "AND checkpoint_id=?", (parent, vm_uuid, checkpoint_id))

    # --- events ---------------------------------------------------------------------
    def append_event(self, event: Event) -> Event:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO events (timestamp, kind, vm_name, vm_uuid, message, details)"
                " VALUES (?,?,?,?,?,?)",
                (event.timestamp, event.kind, event.vm_name, event.vm_uuid, event.message,
                 json.dumps(event.details, default=str)))
            event_id = cursor.lastrowid
            if event_id and event_id % 1000 == 0:
                db.execute("DELETE FROM events WHERE id <= ?", (event_id - MAX_EVENTS,))
        return Event(event.kind, event.message, event.vm_name, event.vm_uuid, event.details,
                     event.timestamp, event_id)

    def list_events(self, vm_name: str | None = None, limit: int = 200) -> list[Event]:
        query = "SELECT id, timestamp, kind, vm_name, vm_uuid, message, details FROM events"
        args: tuple = ()
        if vm_name is not None:
            query += " WHERE vm_name=?"
            args = (vm_name,)
        rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Event(kind, message, name, vm_uuid, json.loads(details), ts, event_id)
                for event_id, ts, kind, name, vm_uuid, message, details in reversed(rows)]
