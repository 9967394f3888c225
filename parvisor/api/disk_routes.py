"""REST routes for disk images and CD/DVD media: a thin skin over ``parvisor.ops.disks``.

Handlers parse and call one ``DiskManager`` method; no checks live here. Paths travel in
bodies or query strings (never in URL paths: they contain '/').
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query

from parvisor.ops.disk_requests import ConvertDisk, CreateDisk, InsertCdrom, ResizeDisk
from parvisor.ops.disks import DiskManager

API_PREFIX = "/v1"


def install_disk_routes(app: FastAPI, service: Any) -> None:
    def disks() -> DiskManager:
        # Built per request: it holds no state of its own (the store and VMs do).
        return DiskManager(service.config, service.store, service.vms)

    @app.post(f"{API_PREFIX}/disks", status_code=201, tags=["disks"])
    def create_disk(body: CreateDisk) -> dict[str, Any]:
        return disks().create(body)

    @app.get(f"{API_PREFIX}/disks/info", tags=["disks"])
    def disk_info(path: str = Query(..., min_length=1, max_length=4096)) -> dict[str, Any]:
        return disks().info(path)

    @app.post(f"{API_PREFIX}/disks/resize", tags=["disks"])
    def resize_disk(body: ResizeDisk) -> dict[str, Any]:
        return disks().resize(body)

    @app.post(f"{API_PREFIX}/disks/convert", status_code=201, tags=["disks"])
    def convert_disk(body: ConvertDisk) -> dict[str, Any]:
        return disks().convert(body)

    @app.delete(f"{API_PREFIX}/disks", tags=["disks"])
    def delete_disk(path: str = Query(..., min_length=1, max_length=4096)) -> dict[str, Any]:
        return disks().delete(path)

    @app.post(f"{API_PREFIX}/vms/{{name}}/cdrom", tags=["actions"])
    async def insert_cdrom(name: str, body: InsertCdrom) -> dict[str, Any]:
        return await disks().insert_cdrom(name, body)

    @app.delete(f"{API_PREFIX}/vms/{{name}}/cdrom", tags=["actions"])
    async def eject_cdrom(name: str, drive: str | None = None) -> dict[str, Any]:
        return await disks().eject_cdrom(name, drive)
