"""Validated requests of ``POST /v1/imports/vmc|disk|ovf`` (shape and range only).

What never: no file system access here; paths, formats, switches and MACs are checked
by ``parvisor.ops.imports`` when the import is prepared.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from parvisor.model.vm import MAX_VCPUS, validate_name
from parvisor.ops.disk_requests import PATH_MAX, Bus
from parvisor.ops.requests import NicRequest, Request, _size

SwitchMap = dict[str, str]          # virtual network name (or "*": any) -> parvisor switch


def _optional_name(value: str | None) -> str | None:
    return None if value is None else validate_name(value, "VM name")


class _ImportRequest(Request):
    path: str = Field(min_length=1, max_length=PATH_MAX)
    name: str | None = None
    switches: SwitchMap = Field(default_factory=dict, max_length=16)

    _name = field_validator("name")(lambda cls, v: _optional_name(v))


class ImportVmc(_ImportRequest):
    """A Virtual Server 2005 / Virtual PC ``.vmc`` with its VHDs."""

    undo: Literal["commit", "discard"] | None = None
    saved_state: Literal["discard"] | None = None
    skip_missing: bool = False


class ImportOvf(_ImportRequest):
    """An OVF descriptor (disks beside it) or an OVA archive."""


class ImportDisk(Request):
    """P2V: a VM around an existing disk image (read only, converted to qcow2)."""

    path: str = Field(min_length=1, max_length=PATH_MAX)
    name: str
    format: Literal["raw", "qcow2", "vmdk", "vpc", "vhdx"] | None = None  # None: sniffed
    bus: Bus = "ide"              # what a physical machine's OS can boot from without drivers
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory: int | str = "1G"
    os_type: Literal["linux", "windows", "other"] = "other"
    nics: list[NicRequest] = Field(default_factory=list, max_length=8)

    _name = field_validator("name")(lambda cls, v: validate_name(v, "VM name"))

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: object) -> int | None:
        return _size(value, "memory")
