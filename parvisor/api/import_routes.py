"""REST routes of ``parvisor import``: a thin skin over ``parvisor.ops.imports``.

``POST /v1/imports/vmc|disk|ovf`` check the request at once (400/404/409 with nothing
started) and answer 202 with the ``import`` job; ``GET /v1/jobs/{id}`` follows it, its
``result`` holds the VM and the attention report. No logic lives here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from parvisor.ops.import_requests import ImportDisk, ImportOvf, ImportVmc
from parvisor.ops.imports import ImportManager

API_PREFIX = "/v1"


def install_import_routes(app: FastAPI, service: Any) -> None:
    def imports() -> ImportManager:
        # Built per request: its only state (running staging folders) is module-wide.
        return ImportManager(service.config, service.store, service.vms, service.jobs)

    @app.post(f"{API_PREFIX}/imports/vmc", status_code=202, tags=["imports"])
    async def import_vmc(body: ImportVmc) -> dict[str, Any]:
        return {"job": (await imports().start_vmc(body)).to_dict()}

    @app.post(f"{API_PREFIX}/imports/disk", status_code=202, tags=["imports"])
    async def import_disk(body: ImportDisk) -> dict[str, Any]:
        return {"job": (await imports().start_disk(body)).to_dict()}

    @app.post(f"{API_PREFIX}/imports/ovf", status_code=202, tags=["imports"])
    async def import_ovf(body: ImportOvf) -> dict[str, Any]:
        return {"job": (await imports().start_ovf(body)).to_dict()}
