"""Replication routes (issue 9): ``POST /v1/vms/{name}/replication`` enables it, ``GET``
shows its state, RPO and what a failover would cost, ``DELETE`` disables it, ``POST
/v1/vms/{name}/replication/failover`` asks for a failover (``force``, ``planned``,
``test``, ``test_stop``; none: "fail over now, the primary is down").

Enabling reads the disks' sizes, so it is forwarded to the VM's owner host like other
per-VM requests; the others only read and write etcd and are answered by any member
(``parvisor.api.forward.SERVED_ANYWHERE``): a failover is asked for precisely when the
owner is down. Yet ``--planned`` is carried out by the primary (it pauses its guest) and
``--test``/``--test-stop`` by the replica (it boots a copy of its image): the failover
route sends those to that host's cluster API itself, once (the forwarding header). On a
standalone host they answer 409."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from parvisor.api.forward import FORWARDED_HEADER, Forward
from parvisor.errors import ServiceUnavailable
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
    async def failover_replication(name: str, request: HttpRequest,
                                   body: FailoverReplication | None = None) -> Any:
        flags = body or FailoverReplication()
        requests = _requests(service)
        chosen = dict(planned=flags.planned, test=flags.test, test_stop=flags.test_stop)
        host = None if sum(chosen.values()) + flags.force > 1 else \
            await asyncio.to_thread(requests.acting_host, name, **chosen)
        if _elsewhere(service, host, request):
            return await _forward(service.forwarder, requests, host or "", request)
        return await requests.failover(name, force=flags.force, **chosen)


def _elsewhere(service: Any, host: str | None, request: HttpRequest) -> bool:
    """Another host must act, and this request was not forwarded here already."""
    return (host is not None and host != service.vms.config.host_name
            and getattr(service, "forwarder", None) is not None
            and FORWARDED_HEADER not in request.headers)


async def _forward(forwarder: Any, requests: ReplicationRequests, host: str,
                   request: HttpRequest) -> JSONResponse:
    """Send the failover request to ``host``'s cluster API; its answer, unchanged."""
    member = await asyncio.to_thread(requests.kv.get, requests.keys.member(host))
    url = json.loads(member.value).get("api_url", "") if member is not None else ""
    if not url:
        why = "is not a cluster member now" if member is None else \
            "does not serve the cluster API ([cluster] api_port)"
        raise ServiceUnavailable(f"host {host} must carry this failover out but {why}",
                                 host=host)
    answer = await forwarder.request(Forward(host, url), "POST", request.url.path,
                                     forwarder.headers(request.headers.raw),
                                     await request.body())
    return JSONResponse(status_code=answer.status_code, content=answer.json())
