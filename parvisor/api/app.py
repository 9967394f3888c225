"""The REST API: a thin HTTP skin over the operations in ``parvisor.ops``.

No logic lives in route handlers: they parse, call one manager method, and shape the
answer. Errors become ``{"error": {"code", "message", "details"}}`` with the status
from the error tree (``ParvisorError.http_status``). The unix socket is trusted (root
only, mode 0600); the TCP listener requires a bearer token (see ``create_app``).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from parvisor import __version__
from parvisor.api.switch_routes import install_switch_routes
from parvisor.errors import ParvisorError, Unauthorized
from parvisor.model.vm import VmStatus
from parvisor.ops.requests import BuildImage, CreateVm, DeleteVm, EditVm, ExecInGuest, ShutdownVm
from parvisor.api.disk_routes import install_disk_routes
from parvisor.api.hotplug_routes import install_hotplug_routes
from parvisor.api.import_routes import install_import_routes
from parvisor.api.checkpoint_routes import install_checkpoint_routes
from parvisor.web import install_web
from parvisor.api.cluster_routes import install_cluster_routes
from parvisor.api.migration_routes import install_migration_routes
from parvisor.api.replication_routes import install_replication_routes
from parvisor.api.forward import ForwardingMiddleware
from parvisor.api.vnc_routes import install_vnc_routes
from parvisor.web.guard import WebSocketTokenGuard
from parvisor.api.inventory_routes import install_inventory_routes

API_PREFIX = "/v1"
log = logging.getLogger(__name__)


def create_app(service: Any, *, tokens: tuple[str, ...] | None = None,
               console: bool = False) -> FastAPI:
    """``service`` is a running ``HostService``; ``tokens`` set = bearer auth required;
    ``console``: also the web console, with its own login/roles (``parvisor.web``)."""
    app = FastAPI(title="parvisor host API", version=__version__,
                  description="Manage VMs on one parvisor host.")
    _install_error_handlers(app)
    forwarder = getattr(service, "forwarder", None)
    if forwarder is not None:    # cluster: per-VM requests go to the VM's owner host;
        # added first = innermost: auth, sessions and roles are checked here before
        app.add_middleware(ForwardingMiddleware, forwarder=forwarder)
    if tokens is not None:
        _install_token_auth(app, tokens)
    _vm_routes(app, service)
    _action_routes(app, service)
    _host_routes(app, service)
    install_disk_routes(app, service)
    install_switch_routes(app, service)
    install_hotplug_routes(app, service)
    install_import_routes(app, service)
    install_checkpoint_routes(app, service)   # checkpoints, clone, export/import
    install_cluster_routes(app, service)      # cluster status, host drain/resume
    install_migration_routes(app, service)    # live migration between cluster hosts
    install_replication_routes(app, service)  # VM disk replication between cluster hosts
    install_vnc_routes(app, service)          # WS /v1/vms/NAME/display (graphical console)
    install_inventory_routes(app, service)    # read-only: VM counters, disk listing
    install_web(app, service, console=console)   # /metrics; pages + sessions if console
    return app


def _error(exc: ParvisorError) -> JSONResponse:
    return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ParvisorError)
    async def parvisor_error(_: Request, exc: ParvisorError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(status_code=500, content={"error": {
            "code": "internal", "message": f"internal error: {type(exc).__name__}: {exc}",
            "details": {}}})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"),
                   "message": str(e["msg"]).removeprefix("Value error, ")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return JSONResponse(status_code=400, content={"error": {
            "code": "invalid_input", "message": message, "details": {"errors": errors}}})


def _install_token_auth(app: FastAPI, tokens: tuple[str, ...]) -> None:
    # an "http" middleware never sees WebSockets (the consoles): they get their own gate
    app.add_middleware(WebSocketTokenGuard, tokens=tokens)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not any(hmac.compare_digest(given, t) for t in tokens):
            return _error(Unauthorized("a valid API token is required (Authorization: "
                                       "Bearer TOKEN)"))
        return await call_next(request)


def _vm_routes(app: FastAPI, service: Any) -> None:
    vms = service.vms

    @app.get(f"{API_PREFIX}/vms", response_model=list[VmStatus], tags=["vms"])
    def list_vms() -> list[VmStatus]:
        return vms.list()

    @app.post(f"{API_PREFIX}/vms", response_model=VmStatus, status_code=201, tags=["vms"])
    def create_vm(body: CreateVm) -> VmStatus:
        return vms.create(body)

    @app.get(f"{API_PREFIX}/vms/{{name}}", response_model=VmStatus, tags=["vms"])
    def show_vm(name: str) -> VmStatus:
        return vms.show(name)

    @app.patch(f"{API_PREFIX}/vms/{{name}}", response_model=VmStatus, tags=["vms"])
    async def edit_vm(name: str, body: EditVm) -> VmStatus:
        # stopped: definition only; running: hot-plug (parvisor.ops.hotplug)
        return await vms.hotplug.edit(name, body)

    @app.delete(f"{API_PREFIX}/vms/{{name}}", tags=["vms"])
    async def delete_vm(name: str, force: bool = False) -> dict[str, Any]:
        return await vms.delete(name, force=DeleteVm(force=force).force)

    @app.get(f"{API_PREFIX}/vms/{{name}}/console/log", response_class=PlainTextResponse,
             tags=["vms"])
    def console_log(name: str, tail_bytes: int = Query(65536, ge=1, le=16 << 20)) -> str:
        return service.console_log(name, tail_bytes)

    @app.websocket(f"{API_PREFIX}/vms/{{name}}/console")
    async def console(websocket: WebSocket, name: str) -> None:
        await service.attach_console(websocket, name)


def _action_routes(app: FastAPI, service: Any) -> None:
    vms = service.vms

    @app.post(f"{API_PREFIX}/vms/{{name}}/start", tags=["actions"])
    async def start(name: str) -> dict[str, Any]:
        return await vms.start(name)

    @app.post(f"{API_PREFIX}/vms/{{name}}/shutdown", tags=["actions"])
    async def shutdown(name: str, body: ShutdownVm | None = None) -> dict[str, Any]:
        return await vms.shutdown(name, body.timeout_s if body else None)

    @app.post(f"{API_PREFIX}/vms/{{name}}/turn-off", tags=["actions"])
    async def turn_off(name: str) -> dict[str, Any]:
        return await vms.turn_off(name)

    @app.post(f"{API_PREFIX}/vms/{{name}}/restart", tags=["actions"])
    async def restart(name: str, body: ShutdownVm | None = None) -> dict[str, Any]:
        return await vms.restart(name, body.timeout_s if body else None)

    @app.post(f"{API_PREFIX}/vms/{{name}}/pause", tags=["actions"])
    async def pause(name: str) -> dict[str, Any]:
        return await vms.pause(name)

    @app.post(f"{API_PREFIX}/vms/{{name}}/resume", tags=["actions"])
    async def resume(name: str) -> dict[str, Any]:
        return await vms.resume(name)

    @app.post(f"{API_PREFIX}/vms/{{name}}/save", status_code=202, tags=["actions"])
    async def save(name: str) -> dict[str, Any]:
        return {"job": vms.save(name).to_dict()}

    @app.post(f"{API_PREFIX}/vms/{{name}}/restore", status_code=202, tags=["actions"])
    async def restore(name: str) -> dict[str, Any]:
        return {"job": vms.restore(name).to_dict()}

    @app.post(f"{API_PREFIX}/vms/{{name}}/exec", tags=["actions"])
    async def exec_in_guest(name: str, body: ExecInGuest) -> dict[str, Any]:
        return await vms.exec(name, body.argv, body.input, body.timeout_s)


def _host_routes(app: FastAPI, service: Any) -> None:
    @app.get(f"{API_PREFIX}/host", tags=["host"])
    def host_info() -> dict[str, Any]:
        return asdict(service.host_info())

    @app.post(f"{API_PREFIX}/host/shutdown-vms", tags=["host"])
    async def shutdown_vms() -> dict[str, Any]:
        return {"results": await service.apply_stop_actions()}

    @app.get(f"{API_PREFIX}/events", tags=["host"])
    def events(vm: str | None = None, limit: int = Query(200, ge=1, le=10000)) -> list[dict]:
        return [asdict(e) for e in service.store.list_events(vm, limit)]

    @app.get(f"{API_PREFIX}/jobs", tags=["jobs"])
    def jobs() -> list[dict[str, Any]]:
        return [job.to_dict() for job in service.jobs.list()]

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}", tags=["jobs"])
    def job(job_id: str) -> dict[str, Any]:
        return service.jobs.get(job_id).to_dict()

    @app.get(f"{API_PREFIX}/images/tiny", tags=["images"])
    def tiny_image() -> dict[str, Any]:
        return service.tiny_image_info()

    @app.post(f"{API_PREFIX}/images/tiny", status_code=202, tags=["images"])
    async def build_tiny(body: BuildImage | None = None) -> dict[str, Any]:
        return {"job": service.build_tiny_image(bool(body and body.force)).to_dict()}
