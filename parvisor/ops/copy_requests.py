"""Validated requests for checkpoints, clones and export/import (shape only).

What never: no file system or store access; names are checked with the same rule as
VM names (so '/' and other path characters are refused at the edge).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from parvisor.model.vm import validate_name
from parvisor.ops.disk_requests import PATH_MAX
from parvisor.ops.requests import Request


class CreateCheckpoint(Request):
    name: str | None = None                 # default: ckpt-YYYYmmdd-HHMMSS
    with_memory: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "checkpoint name")


class CloneVm(Request):
    new_name: str
    linked: bool = False

    @field_validator("new_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "VM name")


class ExportVm(Request):
    directory: str = Field(min_length=1, max_length=PATH_MAX)


class ImportExport(Request):
    directory: str = Field(min_length=1, max_length=PATH_MAX)
    name: str | None = None
    mode: Literal["copy", "in-place"] = "copy"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "VM name")
