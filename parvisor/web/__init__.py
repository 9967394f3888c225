"""The web console and ``/metrics``: thin adapters mounted on the API app.

``install_web(app, service, console=...)`` is the one hook ``create_app`` calls.
Every API app gets ``GET /metrics`` (``parvisor.metrics``; on the unix socket it is
trusted like the rest, on the token listener it needs the token). The console app
(``console=True``, served on ``console_listen``) also gets the pages, login and live
updates, all behind ``ConsoleGuard`` (sessions, CSRF, roles; ``parvisor.web.guard``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from parvisor import metrics
from parvisor.web.auth import Authenticator, UsersFile
from parvisor.web.guard import ConsoleGuard
from parvisor.web.routes import install_console_routes

USERS_FILE = "users.json"


def install_web(app: FastAPI, service: Any, *, console: bool = False) -> None:
    _metrics_route(app, service)
    if console:
        auth = Authenticator(UsersFile(service.config.state_dir / USERS_FILE),
                             tokens=lambda: service.config.api_tokens)
        install_console_routes(app, service, auth)
        app.add_middleware(ConsoleGuard, auth=auth)


def _metrics_route(app: FastAPI, service: Any) -> None:
    @app.get("/metrics", tags=["host"], response_class=Response,
             summary="Prometheus metrics of this host and its VMs (docs/metrics.md)")
    async def prometheus_metrics() -> Response:
        snapshot = await metrics.gather(service)
        return Response(metrics.render(service, snapshot), media_type=metrics.CONTENT_TYPE)


def console_server_config(service: Any) -> "uvicorn.Config":
    """The uvicorn listener of ``console_listen`` (HTTPS when the host has TLS files)."""
    import uvicorn

    from parvisor.api.app import create_app
    from parvisor.config import check_console_listen

    config = service.config
    host, port = check_console_listen(config)
    tls = ({"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
           if config.tls_cert and config.tls_key else {})
    # open event streams would hold a graceful shutdown forever: cut them after 2 s
    return uvicorn.Config(create_app(service, console=True), host=host, port=port,
                          log_level="warning", lifespan="off",
                          timeout_graceful_shutdown=2, **tls)
