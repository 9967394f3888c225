"""Live-migration routes: ``POST /v1/vms/{name}/migrate`` records a migration (any
cluster host may take it; the VM's owner host carries it out), ``GET
/v1/vms/{name}/migration`` shows its phase and progress, ``POST
/v1/vms/{name}/migration/cancel`` cancels it until the ownership switch. On a
standalone host they answer 409 (live migration moves VMs between cluster hosts)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from pydantic import Field, field_validator

from parvisor.api.cluster_routes import NotAClusterMember
from parvisor.migration.protocol import MigrationOptions
from parvisor.model.vm import validate_name
from parvisor.ops.requests import Request, _size

API_PREFIX = "/v1"
MAX_DOWNTIME_LIMIT_MS = 60_000


class MigrateVm(Request):
    """``vm migrate NAME --to HOST``."""

    to: str = Field(min_length=1, max_length=64)
    with_storage: bool = False
    quick: bool = False          # save -> move -> restore (the guest stops meanwhile)
    max_downtime_ms: int | None = Field(default=None, ge=1, le=MAX_DOWNTIME_LIMIT_MS)
    bandwidth: int | str | None = None      # bytes per second, or a size like 100M

    @field_validator("to")
    @classmethod
    def _host(cls, value: str) -> str:
        return validate_name(value, "host name")

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _rate(cls, value: object) -> int | None:
        rate = _size(value, "bandwidth")
        if rate is not None and rate < (1 << 20):
            raise ValueError("bandwidth must be at least 1M (per second)")
        return rate

    def options(self) -> MigrationOptions:
        return MigrationOptions(with_storage=self.with_storage, live=not self.quick,
                                max_downtime_ms=self.max_downtime_ms,
                                bandwidth_bytes_per_s=self.bandwidth)  # type: ignore[arg-type]


def _coordinator(service: Any) -> Any:
    coordinator = getattr(service.vms, "migrations", None)
    if coordinator is None:
        raise NotAClusterMember("this host is not a cluster member: live migration "
                                "moves VMs between cluster hosts (see parvisor cluster "
                                "create)")
    return coordinator


def install_migration_routes(app: FastAPI, service: Any) -> None:
    @app.post(f"{API_PREFIX}/vms/{{name}}/migrate", status_code=202, tags=["migration"])
    async def migrate_vm(name: str, body: MigrateVm) -> dict[str, Any]:
        coordinator = _coordinator(service)
        return await asyncio.to_thread(coordinator.request, name, body.to, body.options())

    @app.get(f"{API_PREFIX}/vms/{{name}}/migration", tags=["migration"])
    async def migration_status(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_coordinator(service).get, name)

    @app.post(f"{API_PREFIX}/vms/{{name}}/migration/cancel", tags=["migration"])
    async def cancel_migration(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_coordinator(service).cancel, name)
