"""Checkpoint records (Hyper-V's snapshots): what a checkpoint *is*, as stored.

A checkpoint is a named point in a VM's life: for every writable qcow2 disk of the VM
one qcow2 *internal* snapshot with the tag ``snapshot``, and with ``with_memory`` the
guest's RAM and device state inside one of those snapshots (the ``vmstate_disk``).
Checkpoints form a tree through ``parent``; the store keeps which one is current.

``phase`` makes create/apply/delete a protocol with a recorded step, so a service that
died mid-way finds the half-done checkpoint at its next start (``parvisor.ops.
checkpoints.detect_interrupted``). Versioned (``format_version``) with upgrade
functions like the VM definition. This module only describes records: no I/O.
"""

from __future__ import annotations

import time
import uuid as uuid_mod
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parvisor.model.vm import validate_name

CHECKPOINT_VERSION = 1
SNAPSHOT_TAG_PREFIX = "pv-"       # tags parvisor writes into qcow2 files start with this
# creating: snapshots being taken (may be partial); ready: usable; applying: disks being
# reverted to it (the VM's disks may be mixed: apply again); deleting: snapshots being
# removed (finish with delete again).
Phase = Literal["creating", "ready", "applying", "deleting"]


class CheckpointDisk(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str                     # the VM's disk id (DiskSpec.id)
    path: str
    format: Literal["qcow2"] = "qcow2"


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = CHECKPOINT_VERSION
    id: str = Field(default_factory=lambda: uuid_mod.uuid4().hex[:16])
    vm_uuid: str
    name: str
    parent: str | None = None            # id of the checkpoint this one descends from
    created: float = Field(default_factory=time.time)
    with_memory: bool = False
    vmstate_disk: str | None = None      # disk id holding RAM + device state
    disks: tuple[CheckpointDisk, ...] = ()
    phase: Phase = "creating"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "checkpoint name")

    @property
    def snapshot(self) -> str:
        """The internal snapshot tag in every disk: by id, never by the user's name, so
        a rename or an odd name can never reach qemu-img."""
        return f"{SNAPSHOT_TAG_PREFIX}{self.id}"

    def with_phase(self, phase: Phase) -> "Checkpoint":
        return self.model_copy(update={"phase": phase})

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_UPGRADES: dict[int, Any] = {}        # version -> function(dict) -> dict of version + 1


def checkpoint_from_document(data: dict[str, Any]) -> Checkpoint:
    """Parse a stored document, lifting older versions one step at a time."""
    version = data.get("format_version", 1)
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this parvisor")
    while version < CHECKPOINT_VERSION:
        data = _UPGRADES[version](data)
        version = data["format_version"]
    return Checkpoint.model_validate(data)
