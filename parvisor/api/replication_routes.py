"""Replication routes (issue 9): ``POST /v1/vms/{name}/replication`` enables it, ``GET``
shows its state, RPO and what a failover would cost, ``DELETE`` disables it, ``POST
/v1/vms/{name}/replication/failover`` asks for a failover (``force``, ``planned``,
``test``, ``test_stop``; none: "fail over now, the primary is down").

Enabling reads the disks' sizes, so it is forwarded to the VM's owner host like other
per-VM requests; the others only read and write etcd and are answered by any member
(``parvisor.api.forward.SERVED_ANYWHERE``): a failover is asked for precisely when the
owner is down. On a standalone host they answer 409."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import Field, field_validator

from parvisor.model.vm import validate_name
from parvisor.ops.requests import Request
from parvisor.replication.requests import MAX_STALL_LIMIT_S, ReplicationRequests

API_PREFIX = "/v1"


class EnableReplication(Request):
    """``vm replication enable NAME --mode sync|async [--interval] [--to] [--stall-limit]``."""

    mode: Literal["sync", "async"]
    interval: Literal["30s", "5m", "15m"] | None = None     # protocol.INTERVALS_S
    to: str | None = Field(default=None, min_length=1, max_length=64)
    stall_limit_s: float | None = Field(default=None, gt=0, le=MAX_STALL_LIMIT_S)

    @field_validator("to")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "host name")


class FailoverReplication(Request):
    """At most one flag; none: fail over now because the primary is down."""

    force: bool = False
    planned: bool = False
    test: bool = False
    test_stop: bool = False


def _requests(service: Any) -> ReplicationRequests:
    return ReplicationRequests(service.vms)     # refuses on a standalone host


def install_replication_routes(app: FastAPI, service: Any) -> None:
    base = f"{API_PREFIX}/vms/{{name}}/replication"

    @app.post(base, status_code=201, tags=["replication"])
    async def enable_replication(name: str, body: EnableReplication) -> dict[str, Any]:
        return await asyncio.to_thread(_requests(service).enable, name, body.mode,
                                       body.interval, body.to, body.stall_limit_s)

    @app.get(base, tags=["replication"])
    async def replication_status(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_requests(service).status, name)

    @app.delete(base, tags=["replication"])
    async def disable_replication(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_requests(service).disable, name)

    @app.post(f"{base}/failover", tags=["replication"])
    async def failover_replication(name: str,
                                   body: FailoverReplication | None = None) -> dict[str, Any]:
        flags = body or FailoverReplication()
        return await _requests(service).failover(
            name, force=flags.force, planned=flags.planned, test=flags.test,
            test_stop=flags.test_stop)
