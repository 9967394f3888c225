"""Forwarding: on a cluster any host serves the whole cluster (issue 8).

What for: definitions and ownership live in etcd, so listing, showing, starting and
stopping work on any member. Everything else about one VM (exec, pause, resume, save,
console and its log, checkpoints, hot-add, disks, NICs, CD, delete …) needs the QEMU,
which runs on the VM's owner host. This ASGI middleware sits inside the API's auth
(token, console sessions and roles are checked on the host the user talks to) and
sends such a request to the owner's cluster API (``parvisor.cluster.host_api``: TLS
verified against the cluster CA, the cluster token as bearer token), then returns the
owner's answer unchanged: status code, body, errors. WebSockets (serial console, VNC
display) are relayed both ways. Jobs started on another host are found through the
host name in their id (``job-<host>-<n>``).

Rules (``route_of``, ``choose``: pure):
* a request carrying ``X-Parvisor-Forwarded-By`` is never forwarded again (loop guard);
* served where it arrives: ``GET /v1/vms/NAME``, start, shutdown, turn-off, the
  migration routes and the replication routes but enable (cluster-aware already), and
  any VM without an owner elsewhere;
* owner is a live member → forwarded; owner not a member and the VM active → 503
  naming the host (it may still run there); not active → served here (definition only);
* the owner does not answer (connect timeout) or leaves the cluster while we wait for
  its answer → 503 naming it; a request is never sent twice.

Never: forward without TLS verification and the token; hold a request on a dead owner
for longer than the connect timeout or its lease TTL; retry a forwarded request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import httpx

from parvisor.errors import NotFound, ParvisorError, ServiceUnavailable
from parvisor.model.states import ACTIVE_STATES

log = logging.getLogger(__name__)

FORWARDED_HEADER = "x-parvisor-forwarded-by"
CONNECT_TIMEOUT_S = 3.0
OWNER_CHECK_EVERY_S = 1.0        # while waiting for the owner's answer: still a member?
_VM_PATH = re.compile(r"^/v1/vms/([^/]+)(/.*)?$")
_JOB_PATH = re.compile(r"^/v1/jobs/job-(.+)-(\d+)$")
# (method, rest of the path after /v1/vms/NAME): answered by any member
SERVED_ANYWHERE = {("GET", ""), ("POST", "/start"), ("POST", "/shutdown"),
                   ("POST", "/turn-off"), ("POST", "/migrate"), ("GET", "/migration"),
                   ("POST", "/migration/cancel"),
                   # replication: etcd only (enabling reads the disks: forwarded); a
                   # failover is asked for precisely when the owner is down
                   ("GET", "/replication"), ("DELETE", "/replication"),
                   ("POST", "/replication/failover")}
# never copied to the owner: ours (auth, loop guard) or per connection
_DROP_REQUEST = {"host", "authorization", "cookie", "content-length", "connection",
                 "transfer-encoding", FORWARDED_HEADER, "x-csrf-token"}
_DROP_RESPONSE = {"content-length", "connection", "transfer-encoding", "keep-alive",
                  "server", "date"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


# --- pure decisions --------------------------------------------------------------------
@dataclass(frozen=True)
class VmRoute:
    name: str


@dataclass(frozen=True)
class JobRoute:
    host: str


@dataclass(frozen=True)
class Local:
    pass


@dataclass(frozen=True)
class Forward:
    host: str
    url: str


@dataclass(frozen=True)
class Unavailable:
    host: str
    message: str


Route = VmRoute | JobRoute | None
Decision = Local | Forward | Unavailable


def route_of(kind: str, method: str, path: str, headers: dict[str, str]) -> Route:
    """Which requests may need another host: per-VM actions and foreign job ids.
    ``kind`` is the ASGI scope type (``http`` or ``websocket``)."""
    if FORWARDED_HEADER in headers:
        return None
    if (job := _JOB_PATH.match(path)) and kind == "http" and method == "GET":
        return JobRoute(job.group(1))
    vm = _VM_PATH.match(path)
    if vm is None:
        return None
    rest = vm.group(2) or ""
    if kind == "http" and (method, rest) in SERVED_ANYWHERE:
        return None
    return VmRoute(vm.group(1))


@dataclass(frozen=True)
class OwnerFacts:
    """What etcd says about a VM's owner (``owner`` None: no owner record)."""

    owner: str | None
    member: bool = False          # the owner holds a live lease
    api_url: str = ""             # from its registration
    vm_active: bool = False       # the VM's recorded state is running/paused/…


def choose(here: str, facts: OwnerFacts) -> Decision:
    if facts.owner is None or facts.owner == here:
        return Local()
    if not facts.member:
        if facts.vm_active:
            return Unavailable(facts.owner, f"host {facts.owner} owns this VM and is not "
                               "a cluster member now (down or cut off); it may still run "
                               "there: try again when it is back or after failover")
        return Local()
    if not facts.api_url:
        return Unavailable(facts.owner, f"host {facts.owner} owns this VM but does not "
                           "serve the cluster API ([cluster] api_port); run the command "
                           f"on {facts.owner}")
    return Forward(facts.owner, facts.api_url)


# --- effects: etcd lookups and the owner's API ------------------------------------------
class Forwarder:
    """Owner lookups in the cluster store and calls to other members' cluster APIs."""

    def __init__(self, host: str, store: Any, token: str, client_ssl: ssl.SSLContext) -> None:
        self.host = host
        self.store = store
        self.token = token
        self.ssl = client_ssl
        self._http = httpx.AsyncClient(verify=client_ssl, timeout=httpx.Timeout(
            None, connect=CONNECT_TIMEOUT_S))

    async def decide(self, route: Route) -> Decision:
        if route is None:
            return Local()
        return choose(self.host, await asyncio.to_thread(self._facts, route))

    def _facts(self, route: VmRoute | JobRoute) -> OwnerFacts:
        if isinstance(route, JobRoute):
            owner, active = route.host, True
        else:
            try:
                record = self.store.get_vm(route.name)
            except NotFound:
                return OwnerFacts(None)        # answered here: the usual 404
            doc = self.store.kv.get(self.store.keys.owner(record.uuid))
            owner = json.loads(doc.value)["host"] if doc is not None else None
            active = record.state in ACTIVE_STATES
        if owner is None or owner == self.host:
            return OwnerFacts(owner)
        member = self.store.kv.get(self.store.keys.member(owner))
        registration = json.loads(member.value) if member is not None else {}
        return OwnerFacts(owner, member is not None, registration.get("api_url", ""),
                          active)

    def headers(self, incoming: list[tuple[bytes, bytes]]) -> dict[str, str]:
        kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in incoming
                if k.decode("latin-1").lower() not in _DROP_REQUEST}
        return {**kept, "authorization": f"Bearer {self.token}", FORWARDED_HEADER: self.host}

    async def still_member(self, host: str) -> None:
        """Returns when ``host`` is no longer a cluster member (its lease expired)."""
        key = self.store.keys.member(host)
        while True:
            await asyncio.sleep(OWNER_CHECK_EVERY_S)
            with contextlib.suppress(ParvisorError):
                if await asyncio.to_thread(self.store.kv.get, key) is None:
                    return

    async def request(self, target: Forward, method: str, path_qs: str,
                      headers: dict[str, str], body: bytes) -> httpx.Response:
        """One forwarded request; 503 when the owner cannot be reached or leaves."""
        call = asyncio.ensure_future(self._http.request(
            method, target.url + path_qs, headers=headers, content=body))
        watch = asyncio.ensure_future(self.still_member(target.host))
        try:
            await asyncio.wait([call, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not call.done():
            call.cancel()
            raise ServiceUnavailable(f"host {target.host} (owner) left the cluster before "
                                     "answering; the request may or may not have been "
                                     "carried out", host=target.host)
        try:
            return call.result()
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"host {target.host} (owner) did not answer at {target.url}: "
                f"{type(exc).__name__} {exc}".strip(), host=target.host) from exc

    async def close(self) -> None:
        await self._http.aclose()


# --- the ASGI middleware ----------------------------------------------------------------
class ForwardingMiddleware:
    def __init__(self, app: Callable, forwarder: Forwarder) -> None:
        self.app = app
        self.forwarder = forwarder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        route = route_of(scope["type"], scope.get("method", "GET"), scope["path"], headers)
        try:
            decision = await self.forwarder.decide(route)
        except ParvisorError as exc:
            decision = Unavailable("", exc.message) if exc.http_status == 503 else Local()
        if isinstance(decision, Local):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send, decision)
        if isinstance(decision, Unavailable):
            return await _json_error(send, ServiceUnavailable(decision.message,
                                                              host=decision.host))
        await self._http(scope, receive, send, decision)

    async def _http(self, scope: Scope, receive: Receive, send: Send,
                    target: Forward) -> None:
        body = await _read_body(receive)
        try:
            answer = await self.forwarder.request(
                target, scope["method"], _path_qs(scope),
                self.forwarder.headers(scope.get("headers", [])), body)
        except ParvisorError as exc:
            return await _json_error(send, exc)
        headers = [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in answer.headers.multi_items()
                   if k.lower() not in _DROP_RESPONSE and k.lower() != "content-encoding"]
        content = answer.content       # decoded by httpx: content-encoding dropped above
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send,
                         decision: Forward | Unavailable) -> None:
        message = await receive()                   # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if isinstance(decision, Unavailable):
            return await send({"type": "websocket.close", "code": 4503,
                               "reason": decision.message[:120]})
        await relay_websocket(self.forwarder, decision, scope, receive, send)


async def relay_websocket(forwarder: Forwarder, target: Forward, scope: Scope,
                          receive: Receive, send: Send) -> None:
    """Open the same WebSocket on the owner, then copy frames both ways until either
    side closes. The owner refusing (wrong state, unknown VM) closes ours with 4404."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    url = "wss://" + target.url.removeprefix("https://") + _path_qs(scope)
    headers = forwarder.headers(scope.get("headers", []))
    for name in list(headers):      # the websockets client writes its own handshake
        if name.lower().startswith("sec-websocket-") or name.lower() in (
                "upgrade", "origin", "user-agent"):
            del headers[name]
    try:
        upstream = await connect(url, ssl=forwarder.ssl, additional_headers=headers,
                                 subprotocols=scope.get("subprotocols") or None,
                                 open_timeout=CONNECT_TIMEOUT_S, max_size=None)
    except Exception as exc:    # noqa: BLE001 - refused or unreachable: say which host
        return await send({"type": "websocket.close", "code": 4404,
                           "reason": f"host {target.host} (owner) refused: {exc}"[:120]})
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

    async def client_to_owner() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            await upstream.send(data if data is not None else message.get("text") or "")

    async def owner_to_client() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in upstream:
                key = "bytes" if isinstance(data, bytes) else "text"
                await send({"type": "websocket.send", key: data})

    tasks = [asyncio.ensure_future(client_to_owner()), asyncio.ensure_future(owner_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await upstream.close()
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": upstream.close_code or 1000})


def _path_qs(scope: Scope) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    return scope.get("raw_path", scope["path"].encode()).decode("latin-1") \
        + (f"?{query}" if query else "")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json_error(send: Send, exc: ParvisorError) -> None:
    body = json.dumps({"error": exc.to_dict()}).encode()
    await send({"type": "http.response.start", "status": exc.http_status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
