"""The web console's own routes: login/logout, the page shell, static assets, live
updates (Server-Sent Events). Everything a page *does* goes through the JSON API under
``/v1`` - the same routes and operations the CLI uses - so there is no second path
into the VM manager here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from parvisor.model.states import ACTIVE_STATES
from parvisor.web.auth import Authenticator, Session
from parvisor.web.guard import CSRF_COOKIE, SESSION_COOKIE

STATIC_DIR = Path(__file__).with_name("static")
# web/ at the top of the checkout: ``./setup.sh install`` runs ``npm ci`` there
VENDOR_DIR = Path(__file__).resolve().parents[2] / "web" / "node_modules"
PAGES = ("/ui/", "/ui/create", "/ui/jobs", "/ui/events", "/ui/vms/{name}", "/ui/cluster",
         "/ui/switches", "/ui/disks")
DISPLAY_PAGE = "/ui/vms/{name}/display"
STREAM_TICK_S = 0.25           # how often a stream looks for changes (update latency)
STREAM_EVENTS = 50


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(default="", max_length=64)
    password: str = Field(default="", max_length=1024)
    token: str = Field(default="", max_length=1024)


def install_console_routes(app: FastAPI, service: Any, auth: Authenticator) -> None:
    _session_routes(app, auth, secure=bool(service.config.tls_cert), service=service)
    _page_routes(app)

    @app.get("/ui/api/stream", include_in_schema=False)
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(live_updates(service), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})


def _session_routes(app: FastAPI, auth: Authenticator, *, secure: bool,
                    service: Any) -> None:
    @app.post("/ui/api/login", include_in_schema=False)
    def login(body: Login) -> JSONResponse:
        # JSON only: a cross-site HTML form cannot post application/json (login CSRF)
        session = auth.login(user=body.user, password=body.password, token=body.token)
        response = JSONResponse(_session_view(session))
        _set_cookies(response, session, secure)
        return response

    @app.post("/ui/api/logout", include_in_schema=False)
    def logout(request: Request) -> JSONResponse:
        auth.logout(request.cookies.get(SESSION_COOKIE))
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        response.delete_cookie(CSRF_COOKIE, path="/")
        return response

    @app.get("/ui/api/session", include_in_schema=False)
    def who(request: Request) -> dict[str, Any]:
        user, role = request.state.principal
        session = auth.session(request.cookies.get(SESSION_COOKIE))
        return {"user": user, "role": role.value, "csrf": session.csrf if session else "",
                **where(service)}


def where(service: Any) -> dict[str, Any]:
    """This host's name and its cluster's (None: standalone). Pages show cluster-only
    parts (cluster page, migration) only when the host is a cluster member."""
    cluster = getattr(service, "cluster", None)
    if cluster is None:
        return {"host": service.config.host_name, "cluster": None}
    return {"host": cluster.settings.host, "cluster": cluster.settings.name}


def _session_view(session: Session) -> dict[str, Any]:
    return {"user": session.user, "role": session.role.value, "csrf": session.csrf}


def _set_cookies(response: JSONResponse, session: Session, secure: bool) -> None:
    common = {"path": "/", "samesite": "strict", "secure": secure}
    response.set_cookie(SESSION_COOKIE, session.id, httponly=True, **common)
    response.set_cookie(CSRF_COOKIE, session.csrf, httponly=False, **common)


def _page_routes(app: FastAPI) -> None:
    shell = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=303)

    @app.get("/ui/login", include_in_schema=False)
    def login_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "login.html")

    for path in PAGES:   # one shell; app.js draws the page named by the URL
        app.add_api_route(path, lambda: FileResponse(shell), methods=["GET"],
                          include_in_schema=False)
    # the graphical console is a page of its own: noVNC (ES modules), not the shell
    app.add_api_route(DISPLAY_PAGE, lambda: FileResponse(STATIC_DIR / "display.html"),
                      methods=["GET"], include_in_schema=False)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    app.mount("/ui/vendor", StaticFiles(directory=VENDOR_DIR, check_dir=False),
              name="console-vendor")


# --- live updates --------------------------------------------------------------------
def vm_summaries(service: Any) -> list[dict[str, Any]]:
    """The list page's columns, from the store and runtimes only: ``VmStatus`` would
    run ``qemu-img info`` on changed disks, too slow to do several times a second."""
    records = service.store.list_vms()
    summaries, hosts = [], service.vms.hosts_of_vms(records)
    for record in records:
        definition = record.definition
        runtime = service.vms.runtimes.get(record.uuid)
        process = runtime.process if runtime else None
        summaries.append({
            "name": definition.name, "state": record.state.value,
            "host": hosts.get(record.uuid, "-"),
            "vcpus": definition.vcpus, "memory_bytes": definition.memory_bytes,
            "memory_current_bytes": runtime.memory_current_bytes if process else None,
            "heartbeat": runtime.heartbeat if process else "unknown",
            "uptime_s": (round(process.uptime_s, 1) if process else None),
            "active": record.state in ACTIVE_STATES, "ha": definition.ha,
            "revision": record.generation})
    return summaries


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


async def live_updates(service: Any) -> AsyncIterator[str]:
    """Send the VM list, new events and jobs whenever they change (first: everything).
    Uptime is left out of the change test (it changes every tick); pages extrapolate."""
    seen: dict[str, str] = {}
    # pages load the history themselves (GET /v1/events); the stream sends what is new
    newest = service.store.list_events(None, 1)
    last_event = newest[-1].id if newest else 0
    while True:
        vms = vm_summaries(service)
        key = _digest([{k: v for k, v in vm.items() if k != "uptime_s"} for vm in vms])
        if seen.get("vms") != key:
            seen["vms"] = key
            yield _sse("vms", vms)
        events = [e for e in service.store.list_events(None, STREAM_EVENTS) if e.id > last_event]
        if events:
            last_event = events[-1].id
            yield _sse("events", [asdict(e) for e in events])
        jobs = [job.to_dict() for job in service.jobs.list()]
        if seen.get("jobs") != (key := _digest(jobs)):
            seen["jobs"] = key
            yield _sse("jobs", jobs)
        await asyncio.sleep(STREAM_TICK_S)
