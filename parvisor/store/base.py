"""The store interface: where VM definitions, runtime state and events are kept.

A standalone host uses ``SqliteStore``; the cluster issue adds an etcd store with the
same interface. Rules every implementation keeps:

* a write returns only after it is durable (INV-3: acknowledged means committed);
* writes are atomic: a crash at any point leaves the old or the new record, never half;
* ``update_*`` take the ``generation`` the caller read and refuse (``Busy``) if the
  record changed since: two concurrent edits cannot silently overwrite each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition


@dataclass(frozen=True)
class VmRecord:
    definition: VmDefinition
    state: VmState
    state_reason: str
    desired_state: str          # "running" or "off": what the user asked for last
    generation: int             # bumps on every write of this record

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def uuid(self) -> str:
        return self.definition.uuid


@dataclass(frozen=True)
class Event:
    kind: str                   # "state", "error", "created", "deleted", "edited", "job"
    message: str
    vm_name: str | None = None
    vm_uuid: str | None = None
    details: dict = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)   # wall clock: for people only
    id: int | None = None


class Store(Protocol):
    def create_vm(self, definition: VmDefinition) -> VmRecord: ...
    def get_vm(self, name: str) -> VmRecord: ...
    def get_vm_by_uuid(self, vm_uuid: str) -> VmRecord: ...
    def list_vms(self) -> list[VmRecord]: ...
    def update_definition(self, definition: VmDefinition, generation: int) -> VmRecord: ...
    def set_state(self, vm_uuid: str, state: VmState, reason: str = "", *,
                  desired_state: str | None = None) -> VmRecord: ...
    def delete_vm(self, vm_uuid: str) -> None: ...
    def put_switch(self, name: str, document: dict, *, create: bool) -> None: ...
    def get_switch(self, name: str) -> dict: ...
    def list_switches(self) -> list[dict]: ...
    def delete_switch(self, name: str) -> None: ...
    # Checkpoints (parvisor.model.checkpoint documents: "id", "vm_uuid", "name",
    # "parent", ...). The store keeps them and two integrity rules, nothing else:
    # * put_checkpoint: create=True refuses an existing id (AlreadyExists), create=False
    #   an unknown one (NotFound); a second checkpoint with the same name on one VM is
    #   refused either way (AlreadyExists). make_current=True also makes it the VM's
    #   current checkpoint, in the same transaction.
    # * delete_checkpoint: removes it; in the same transaction its children's "parent"
    #   and the VM's current pointer (if it named this one) move to its parent.
    # * list_checkpoints: the VM's documents, oldest ("created") first.
    # * current_checkpoint: the id the VM's present state descends from, or None.
    # * delete_vm also removes the VM's checkpoints and current pointer.
    def put_checkpoint(self, document: dict, *, create: bool,
                       make_current: bool = False) -> None: ...
    def list_checkpoints(self, vm_uuid: str) -> list[dict]: ...
    def current_checkpoint(self, vm_uuid: str) -> str | None: ...
    def delete_checkpoint(self, vm_uuid: str, checkpoint_id: str) -> None: ...
    def append_event(self, event: Event) -> Event: ...
    def list_events(self, vm_name: str | None = None, limit: int = 200) -> list[Event]: ...
    def close(self) -> None: ...
