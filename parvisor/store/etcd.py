"""The Store on etcd, for hosts in a failover cluster (same interface as SqliteStore).

What for: VM definitions, runtime state, switches and events live under one cluster
prefix so every host's CLI sees the same VMs. Every write is one etcd transaction with
explicit compares; a call returns only after etcd committed it (a majority persisted
it: INV-3 survives the loss of a minority of members). ``generation`` is the VM key's
mod revision, so ``update_definition`` is conditioned on exactly what the caller read
(``Busy`` otherwise). Ownership and membership keys (cluster runtime) are written by
``parvisor.cluster.etcd_env``; their names are defined here in ``Keys``.

Never: read-modify-write without a compare, or keep state outside etcd.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from parvisor.cluster.etcd_kv import (EtcdKV, KeyValue, b64, cmp_absent, cmp_mod,
                                      cmp_present, op_delete, op_put, prefix_end)
from parvisor.errors import AlreadyExists, Busy, NotFound, StoreError
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition, upgrade_definition
from parvisor.store.base import Event, VmRecord

MAX_CAS_RETRIES = 20      # set_state / append_event retry a lost compare this often
EVENTS_KEPT = 5000        # the newest events stay in etcd (a VM action writes one or two)


@dataclass(frozen=True)
class Keys:
    """The key layout under ``/parvisor/<cluster>/``."""

    prefix: str

    def vm(self, uuid: str) -> str: return f"{self.prefix}vm/{uuid}"
    def vm_name(self, name: str) -> str: return f"{self.prefix}vmname/{name}"
    def switch(self, name: str) -> str: return f"{self.prefix}switch/{name}"
    def event(self, seq: int) -> str: return f"{self.prefix}event/{seq:020d}"
    def owner(self, uuid: str) -> str: return f"{self.prefix}owner/{uuid}"
    def status(self, uuid: str) -> str: return f"{self.prefix}status/{uuid}"
    def ha_policy(self, uuid: str) -> str: return f"{self.prefix}hapolicy/{uuid}"
    def member(self, host: str) -> str: return f"{self.prefix}members/{host}"
    def host(self, host: str) -> str: return f"{self.prefix}hosts/{host}"
    def maintenance(self, host: str) -> str: return f"{self.prefix}maint/{host}"
    def checkpoint(self, vm: str, cid: str) -> str: return f"{self.prefix}ckpt/{vm}/{cid}"
    def checkpoints(self, vm: str) -> str: return f"{self.prefix}ckpt/{vm}/"
    def checkpoint_current(self, vm: str) -> str: return f"{self.prefix}ckptcur/{vm}"
    def checkpoint_seq(self, vm: str) -> str: return f"{self.prefix}ckptseq/{vm}"
    def migration(self, uuid: str) -> str: return f"{self.prefix}migration/{uuid}"
    def replication(self, uuid: str) -> str: return f"{self.prefix}replication/{uuid}"
    # the host whose local storage holds a VM's disks (absent: shared storage)
    def disk_host(self, uuid: str) -> str: return f"{self.prefix}diskhost/{uuid}"

    @property
    def event_seq(self) -> str: return f"{self.prefix}eventseq"

    @property
    def manager(self) -> str: return f"{self.prefix}manager"

    @property
    def cpu_baseline(self) -> str: return f"{self.prefix}cpubaseline"

    def under(self, kind: str) -> str:
        return f"{self.prefix}{kind}/"


def _record(item: KeyValue) -> VmRecord:
    doc = json.loads(item.value)
    definition = VmDefinition.model_validate(upgrade_definition(doc["definition"]))
    return VmRecord(definition, VmState(doc["state"]), doc.get("state_reason", ""),
                    doc.get("desired_state", "off"), item.mod_revision)


def _doc(definition: VmDefinition, state: VmState, reason: str, desired: str) -> str:
    return json.dumps({"definition": json.loads(definition.model_dump_json()),
                       "state": state.value, "state_reason": reason,
                       "desired_state": desired}, sort_keys=True)


class EtcdStore:
    def __init__(self, kv: EtcdKV, cluster: str) -> None:
        self.kv = kv
        self.keys = Keys(f"/parvisor/{cluster}/")

    def close(self) -> None:
        """Nothing to release: every call is one HTTP request."""

    # --- VMs ------------------------------------------------------------------------
    def create_vm(self, definition: VmDefinition) -> VmRecord:
        k = self.keys
        ok, revision, _ = self.kv.txn(
            [cmp_absent(k.vm_name(definition.name)), cmp_absent(k.vm(definition.uuid))],
            [op_put(k.vm(definition.uuid), _doc(definition, VmState.OFF, "", "off")),
             op_put(k.vm_name(definition.name), definition.uuid)])
        if not ok:
            raise AlreadyExists(f"a VM named '{definition.name}' already exists",
                                name=definition.name)
        return VmRecord(definition, VmState.OFF, "", "off", revision)

    def get_vm(self, name: str) -> VmRecord:
        index = self.kv.get(self.keys.vm_name(name))
        if index is None:
            raise NotFound(f"no VM named '{name}'", name=name)
        return self.get_vm_by_uuid(index.value.decode())

    def get_vm_by_uuid(self, vm_uuid: str) -> VmRecord:
        item = self.kv.get(self.keys.vm(vm_uuid))
        if item is None:
            raise NotFound(f"no VM with uuid {vm_uuid}", uuid=vm_uuid)
        return _record(item)

    def list_vms(self) -> list[VmRecord]:
        items, _ = self.kv.get_prefix(self.keys.under("vm"))
        return sorted((_record(item) for item in items), key=lambda r: r.name)

    def definition_txn_parts(self, definition: VmDefinition, record: VmRecord
                             ) -> tuple[list[dict], list[dict]]:
        """Compare + put that replace a definition (same name) inside a caller's txn,
        e.g. the live-migration switch that also moves the owner record."""
        key = self.keys.vm(definition.uuid)
        return ([cmp_mod(key, record.generation)],
                [op_put(key, _doc(definition, record.state, record.state_reason,
                                  record.desired_state))])

    def update_definition(self, definition: VmDefinition, generation: int) -> VmRecord:
        k = self.keys
        current = self.get_vm_by_uuid(definition.uuid)
        compare = [cmp_mod(k.vm(definition.uuid), generation)]
        ops = [op_put(k.vm(definition.uuid), _doc(definition, current.state,
                                                  current.state_reason,
                                                  current.desired_state))]
        if current.name != definition.name:
            compare.append(cmp_absent(k.vm_name(definition.name)))
            ops += [op_delete(k.vm_name(current.name)),
                    op_put(k.vm_name(definition.name), definition.uuid)]
        ok, _, _ = self.kv.txn(compare, ops)
        if not ok:
            if self.get_vm_by_uuid(definition.uuid).generation != generation \
                    or current.generation != generation:
                raise Busy(f"VM '{current.name}' was changed by another request; read it "
                           "again", name=current.name)
            raise AlreadyExists(f"a VM named '{definition.name}' already exists",
                                name=definition.name)
        return self.get_vm_by_uuid(definition.uuid)

    def set_state(self, vm_uuid: str, state: VmState, reason: str = "", *,
                  desired_state: str | None = None) -> VmRecord:
        for _attempt in range(MAX_CAS_RETRIES):
            current = self.get_vm_by_uuid(vm_uuid)
            desired = desired_state if desired_state is not None else current.desired_state
            ok, _, _ = self.kv.txn(
                [cmp_mod(self.keys.vm(vm_uuid), current.generation)],
                [op_put(self.keys.vm(vm_uuid), _doc(current.definition, state, reason,
                                                    desired))])
            if ok:
                return self.get_vm_by_uuid(vm_uuid)
        raise StoreError(f"state of VM {vm_uuid} kept changing; gave up", uuid=vm_uuid)

    def delete_vm(self, vm_uuid: str) -> None:
        item = self.kv.get(self.keys.vm(vm_uuid))
        if item is None:
            return
        name = _record(item).name
        self.kv.txn([cmp_mod(self.keys.vm(vm_uuid), item.mod_revision)],
                    [op_delete(self.keys.vm(vm_uuid)), op_delete(self.keys.vm_name(name)),
                     op_delete(self.keys.owner(vm_uuid)), op_delete(self.keys.status(vm_uuid)),
                     op_delete(self.keys.ha_policy(vm_uuid)),
                     op_delete(self.keys.checkpoint_current(vm_uuid)),
                     op_delete(self.keys.checkpoint_seq(vm_uuid)),
                     op_delete_prefix(self.keys.checkpoints(vm_uuid))])

    # --- switches -------------------------------------------------------------------
    def put_switch(self, name: str, document: dict, *, create: bool) -> None:
        key = self.keys.switch(name)
        guard = cmp_absent(key) if create else cmp_present(key)
        ok, _, _ = self.kv.txn([guard], [op_put(key, json.dumps(document, sort_keys=True))])
        if not ok and create:
            raise AlreadyExists(f"a switch named '{name}' already exists", name=name)
        if not ok:
            raise NotFound(f"no switch named '{name}'", name=name)

    def get_switch(self, name: str) -> dict:
        item = self.kv.get(self.keys.switch(name))
        if item is None:
            raise NotFound(f"no switch named '{name}'", name=name)
        return json.loads(item.value)

    def list_switches(self) -> list[dict]:
        items, _ = self.kv.get_prefix(self.keys.under("switch"))
        return [json.loads(item.value) for item in items]     # sorted by key = name

    def delete_switch(self, name: str) -> None:
        key = self.keys.switch(name)
        ok, _, _ = self.kv.txn([cmp_present(key)], [op_delete(key)])
        if not ok:
            raise NotFound(f"no switch named '{name}'", name=name)

    # --- checkpoints (documents owned by parvisor.ops.checkpoints) ---------------------
    # Every change of a VM's checkpoints bumps ckptseq/<vm> in the same txn, compared on
    # the revision read: concurrent changes (deletions too) make the loser retry.
    def _checkpoint_state(self, vm_uuid: str) -> tuple[dict[str, dict], str | None, int]:
        k = self.keys
        items, _ = self.kv.get_prefix(k.checkpoints(vm_uuid))
        docs = {item.key.rsplit("/", 1)[1]: json.loads(item.value) for item in items}
        current = self.kv.get(k.checkpoint_current(vm_uuid))
        seq = self.kv.get(k.checkpoint_seq(vm_uuid))
        return docs, current.value.decode() if current else None, \
            seq.mod_revision if seq else 0

    def _checkpoint_txn(self, vm_uuid: str, plan) -> None:
        k = self.keys
        for _attempt in range(MAX_CAS_RETRIES):
            docs, current, seq_rev = self._checkpoint_state(vm_uuid)
            ops = plan(docs, current)
            ok, _, _ = self.kv.txn([cmp_mod(k.checkpoint_seq(vm_uuid), seq_rev)],
                                   [*ops, op_put(k.checkpoint_seq(vm_uuid), str(seq_rev))])
            if ok:
                return
        raise StoreError(f"checkpoints of VM {vm_uuid} kept changing; gave up")

    def put_checkpoint(self, document: dict, *, create: bool,
                       make_current: bool = False) -> None:
        vm_uuid, cid, name = document["vm_uuid"], document["id"], document["name"]

        def plan(docs: dict[str, dict], _current: str | None) -> list[dict]:
            if create and cid in docs:
                raise AlreadyExists(f"checkpoint id {cid} already exists")
            if not create and cid not in docs:
                raise NotFound(f"no checkpoint {name!r} of this VM", name=name)
            if any(d["name"] == name and i != cid for i, d in docs.items()):
                raise AlreadyExists(f"the VM already has a checkpoint named {name!r}",
                                    name=name)
            ops = [op_put(self.keys.checkpoint(vm_uuid, cid),
                          json.dumps(document, sort_keys=True))]
            if make_current:
                ops.append(op_put(self.keys.checkpoint_current(vm_uuid), cid))
            return ops
        self._checkpoint_txn(vm_uuid, plan)

    def list_checkpoints(self, vm_uuid: str) -> list[dict]:
        docs, _, _ = self._checkpoint_state(vm_uuid)
        return sorted(docs.values(), key=lambda d: (d.get("created", 0), d["id"]))

    def current_checkpoint(self, vm_uuid: str) -> str | None:
        item = self.kv.get(self.keys.checkpoint_current(vm_uuid))
        return item.value.decode() if item else None

    def delete_checkpoint(self, vm_uuid: str, checkpoint_id: str) -> None:
        def plan(docs: dict[str, dict], current: str | None) -> list[dict]:
            if checkpoint_id not in docs:
                raise NotFound(f"no checkpoint {checkpoint_id} of this VM")
            parent = docs[checkpoint_id].get("parent")
            ops = [op_put(self.keys.checkpoint(vm_uuid, cid),
                          json.dumps({**doc, "parent": parent}, sort_keys=True))
                   for cid, doc in sorted(docs.items()) if doc.get("parent") == checkpoint_id]
            ops.append(op_delete(self.keys.checkpoint(vm_uuid, checkpoint_id)))
            if current == checkpoint_id:
                ops.append(op_put(self.keys.checkpoint_current(vm_uuid), parent)
                           if parent else op_delete(self.keys.checkpoint_current(vm_uuid)))
            return ops
        self._checkpoint_txn(vm_uuid, plan)

    # --- events ---------------------------------------------------------------------
    def append_event(self, event: Event) -> Event:
        """Events get consecutive ids from a counter key bumped in the same txn."""
        k = self.keys
        for _attempt in range(MAX_CAS_RETRIES):
            seq_item = self.kv.get(k.event_seq)
            seq = int(seq_item.value) + 1 if seq_item else 1
            guard = cmp_mod(k.event_seq, seq_item.mod_revision) if seq_item \
                else cmp_absent(k.event_seq)
            body = json.dumps({"kind": event.kind, "message": event.message,
                               "vm_name": event.vm_name, "vm_uuid": event.vm_uuid,
                               "details": event.details, "timestamp": event.timestamp},
                              default=str, sort_keys=True)
            ops = [op_put(k.event_seq, str(seq)), op_put(k.event(seq), body)]
            if seq > EVENTS_KEPT:       # a sliding window: the oldest one goes
                ops.append(op_delete(k.event(seq - EVENTS_KEPT)))
            ok, _, _ = self.kv.txn([guard], ops)
            if ok:
                return Event(event.kind, event.message, event.vm_name, event.vm_uuid,
                             event.details, event.timestamp, seq)
        raise StoreError("event counter kept changing; event not recorded")

    def list_events(self, vm_name: str | None = None, limit: int = 200) -> list[Event]:
        if not limit:
            return []
        start = self.keys.under("event")
        end = start[:-1] + "0"
        # newest first, only as many as asked when not filtering by VM
        items, _ = self.kv.range(start, end, descending=True,
                                 limit=limit if vm_name is None else 0)
        items.reverse()
        events = []
        for item in items:
            doc = json.loads(item.value)
            if vm_name is not None and doc["vm_name"] != vm_name:
                continue
            events.append(Event(doc["kind"], doc["message"], doc["vm_name"], doc["vm_uuid"],
                                doc["details"], doc["timestamp"],
                                int(item.key.rsplit("/", 1)[1])))
        return events[-limit:] if limit else []


def op_delete_prefix(prefix: str) -> dict:
    return {"request_delete_range": {"key": b64(prefix), "range_end": prefix_end(prefix)}}
