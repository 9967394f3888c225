"""Routes for hot-added network adapters and disks (``/v1/vms/{name}/nics|disks``).

Thin: parse, call ``HotplugIo`` (parvisor.ops.hotplug_io), return its answer. Running
VMs change live, stopped ones in their definition. ``PATCH /v1/vms/{name}`` (vm set,
including hot-add of vCPUs/memory and resource controls) lives in ``app.py``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from parvisor.ops.requests import AddDisk, AddNic

API_PREFIX = "/v1"


def install_hotplug_routes(app: FastAPI, service: Any) -> None:
    def io() -> Any:
        return service.vms.hotplug_io      # looked up per request (placeholder for docs)

    @app.post(f"{API_PREFIX}/vms/{{name}}/nics", status_code=201, tags=["hot-add"])
    async def add_nic(name: str, body: AddNic) -> dict[str, Any]:
        return await io().add_nic(name, body)

    @app.delete(f"{API_PREFIX}/vms/{{name}}/nics/{{nic_id}}", tags=["hot-add"])
    async def remove_nic(name: str, nic_id: str) -> dict[str, Any]:
        return await io().remove_nic(name, nic_id)

    @app.post(f"{API_PREFIX}/vms/{{name}}/disks", status_code=201, tags=["hot-add"])
    async def add_disk(name: str, body: AddDisk) -> dict[str, Any]:
        return await io().add_disk(name, body)

    @app.delete(f"{API_PREFIX}/vms/{{name}}/disks/{{disk_id}}", tags=["hot-add"])
    async def remove_disk(name: str, disk_id: str) -> dict[str, Any]:
        return await io().remove_disk(name, disk_id)
