"""Cluster routes: ``GET /v1/cluster`` (status) and host drain/resume. On a standalone
host they answer 409 (not a cluster member)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from pydantic import Field

from parvisor.errors import Refused
from parvisor.ops.requests import Request


class CpuBaseline(Request):
    """A named QEMU CPU model, ``auto`` (the best model every host runs) or ``none``."""

    model: str = Field(min_length=1, max_length=64)

PREFIX = "/v1/cluster"


class NotAClusterMember(Refused):
    """A cluster-only route on a standalone host (409; nothing changed)."""

    code = "not_a_cluster_member"
    http_status = 409


def _runtime(service: Any) -> Any:
    if getattr(service, "cluster", None) is None:
        raise NotAClusterMember("this host is not a cluster member "
                                "(see parvisor cluster create)")
    return service.cluster


def install_cluster_routes(app: FastAPI, service: Any) -> None:
    @app.get(PREFIX, tags=["cluster"])
    async def cluster_status() -> dict[str, Any]:
        return await asyncio.to_thread(_runtime(service).status)

    @app.post(f"{PREFIX}/hosts/{{name}}/drain", tags=["cluster"])
    async def drain_host(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_runtime(service).set_maintenance, name, True)

    @app.put(f"{PREFIX}/cpu-baseline", tags=["cluster"])
    async def set_cpu_baseline(body: CpuBaseline) -> dict[str, Any]:
        return await asyncio.to_thread(_runtime(service).set_cpu_baseline, body.model)

    @app.post(f"{PREFIX}/hosts/{{name}}/resume", tags=["cluster"])
    async def resume_host(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_runtime(service).set_maintenance, name, False)
