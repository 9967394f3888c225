"""REST routes for checkpoints, clones and export/import of VMs: a thin skin over
``parvisor.ops.checkpoints``, ``ops.clones`` and ``ops.export``.

Long operations answer 202 with a job (poll ``GET /v1/jobs/{id}``); handlers only parse
and call one method. Directories travel in bodies (never in URL paths).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from parvisor.ops.checkpoints import CheckpointManager
from parvisor.ops.clones import CloneManager
from parvisor.ops.copy_requests import CloneVm, CreateCheckpoint, ExportVm, ImportExport
from parvisor.ops.export import ExportManager

API_PREFIX = "/v1"


def install_checkpoint_routes(app: FastAPI, service: Any) -> None:
    # Managers are built per request: their state is the store's and the runtimes'.
    def checkpoints() -> CheckpointManager:
        return CheckpointManager(service.vms)

    @app.get(f"{API_PREFIX}/vms/{{name}}/checkpoints", tags=["checkpoints"])
    def list_checkpoints(name: str) -> dict[str, Any]:
        return checkpoints().list(name)

    @app.post(f"{API_PREFIX}/vms/{{name}}/checkpoints", status_code=202,
              tags=["checkpoints"])
    async def create_checkpoint(name: str, body: CreateCheckpoint) -> dict[str, Any]:
        return {"job": checkpoints().create(name, body).to_dict()}

    @app.post(f"{API_PREFIX}/vms/{{name}}/checkpoints/{{checkpoint}}/apply",
              status_code=202, tags=["checkpoints"])
    async def apply_checkpoint(name: str, checkpoint: str) -> dict[str, Any]:
        return {"job": checkpoints().apply(name, checkpoint).to_dict()}

    @app.delete(f"{API_PREFIX}/vms/{{name}}/checkpoints/{{checkpoint}}", status_code=202,
                tags=["checkpoints"])
    async def delete_checkpoint(name: str, checkpoint: str) -> dict[str, Any]:
        return {"job": checkpoints().delete(name, checkpoint).to_dict()}

    @app.post(f"{API_PREFIX}/vms/{{name}}/clone", status_code=202, tags=["vms"])
    async def clone_vm(name: str, body: CloneVm) -> dict[str, Any]:
        return {"job": CloneManager(service.vms).clone(name, body).to_dict()}

    @app.post(f"{API_PREFIX}/vms/{{name}}/export", status_code=202, tags=["vms"])
    async def export_vm(name: str, body: ExportVm) -> dict[str, Any]:
        return {"job": ExportManager(service.vms).export(name, body).to_dict()}

    @app.post(f"{API_PREFIX}/vm-imports", status_code=202, tags=["vms"])
    async def import_vm(body: ImportExport) -> dict[str, Any]:
        return {"job": ExportManager(service.vms).import_(body).to_dict()}
