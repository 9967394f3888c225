"""Validated requests: what a client may ask for, checked at the edge.

Unknown fields are refused (``extra="forbid"``) so a typo never silently does nothing.
Sizes accept ``256M``/``1G``/``1GiB`` or a byte count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parvisor.model.sizes import parse_size
from parvisor.model.vm import MAX_VCPUS, AutoStartAction, AutoStopAction, validate_name


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _size(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return parse_size(value, what=what)
    raise ValueError(f"{what} must be a size like 256M or a number of bytes")


class CreateVm(Request):
    name: str
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    max_vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    memory: int | str = "256M"
    max_memory: int | str | None = None
    image: Literal["tiny"] | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = Field(default=None, max_length=4096)
    disk: str | None = None
    ha: bool = False
    auto_start_action: AutoStartAction = AutoStartAction.START_IF_RUNNING
    auto_start_delay_s: int = Field(default=0, ge=0, le=3600)
    auto_stop_action: AutoStopAction = AutoStopAction.SAVE
    notes: str = Field(default="", max_length=4096)

    _name = field_validator("name")(lambda cls, v: validate_name(v))

    @field_validator("memory", "max_memory", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int | None:
        return _size(value, "memory")


class EditVm(Request):
    vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    max_vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    memory: int | str | None = None
    max_memory: int | str | None = None
    notes: str | None = Field(default=None, max_length=4096)
    ha: bool | None = None
    auto_start_action: AutoStartAction | None = None
    auto_start_delay_s: int | None = Field(default=None, ge=0, le=3600)
    auto_stop_action: AutoStopAction | None = None
    cmdline: str | None = Field(default=None, max_length=4096)

    @field_validator("memory", "max_memory", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int | None:
        return _size(value, "memory")


class ShutdownVm(Request):
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


class DeleteVm(Request):
    force: bool = False


class ExecInGuest(Request):
    argv: list[str] = Field(min_length=1, max_length=256)
    input: str | None = Field(default=None, max_length=1 << 20)
    timeout_s: float = Field(default=60, gt=0, le=3600)


class BuildImage(Request):
    force: bool = False
