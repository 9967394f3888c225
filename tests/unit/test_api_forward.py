"""API forwarding between cluster members (parvisor.api.forward): which requests go to
the VM's owner, the loop guard, and what the caller gets when the owner answers, refuses
or is gone. The owner here is a real uvicorn server with TLS from a real cluster CA and
the token check of the real API; the cluster store is a small fake (the lab test in
tests/integration/test_cluster_forwarding.py runs the whole thing on etcd)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, WebSocket

from parvisor.api import app as api_app
from parvisor.api.forward import (FORWARDED_HEADER, Forward, Forwarder, ForwardingMiddleware,
                                  JobRoute, Local, OwnerFacts, Unavailable, VmRoute, choose,
                                  route_of)
from parvisor.cluster import certs
from parvisor.cluster.etcd_kv import KeyValue
from parvisor.errors import Busy, NotFound
from parvisor.model.states import VmState
from parvisor.store.etcd import Keys

TOKEN = "cluster-token-for-tests"
HANGING_S = 20.0


# --- pure rules -----------------------------------------------------------------------
@pytest.mark.parametrize("kind, method, path, expected", [
    ("http", "POST", "/v1/vms/web/pause", VmRoute("web")),
    ("http", "POST", "/v1/vms/web/exec", VmRoute("web")),
    ("http", "PATCH", "/v1/vms/web", VmRoute("web")),
    ("http", "DELETE", "/v1/vms/web", VmRoute("web")),
    ("http", "POST", "/v1/vms/web/checkpoints", VmRoute("web")),
    ("http", "GET", "/v1/vms/web/console/log", VmRoute("web")),
    ("websocket", "GET", "/v1/vms/web/console", VmRoute("web")),
    ("http", "GET", "/v1/jobs/job-h1-7", JobRoute("h1")),
    ("http", "GET", "/v1/jobs/job-my-host-7", JobRoute("my-host")),
    # answered by any member: cluster-aware already, or not about one VM
    ("http", "GET", "/v1/vms/web", None),
    ("http", "POST", "/v1/vms/web/start", None),
    ("http", "POST", "/v1/vms/web/shutdown", None),
    ("http", "POST", "/v1/vms/web/turn-off", None),
    ("http", "POST", "/v1/vms/web/migrate", None),
    ("http", "GET", "/v1/vms", None),
    ("http", "POST", "/v1/vms", None),
    ("http", "GET", "/v1/jobs/job-3", None),          # a standalone host's job id
    ("http", "GET", "/v1/cluster", None),
])
def test_which_requests_may_need_the_owner(kind, method, path, expected):
    assert route_of(kind, method, path, {}) == expected


def test_a_forwarded_request_is_never_forwarded_again():
    assert route_of("http", "POST", "/v1/vms/web/pause", {FORWARDED_HEADER: "h2"}) is None
    assert route_of("websocket", "GET", "/v1/vms/web/console", {FORWARDED_HEADER: "h2"}) is None


@pytest.mark.parametrize("facts, expected", [
    (OwnerFacts(None), Local()),
    (OwnerFacts("h1"), Local()),                                   # ours
    (OwnerFacts("h2", True, "https://10.0.0.2:8444", True), Forward("h2", "https://10.0.0.2:8444")),
    (OwnerFacts("h2", True, "https://10.0.0.2:8444", False), Forward("h2", "https://10.0.0.2:8444")),
    (OwnerFacts("h2", False, "", False), Local()),     # stopped on a gone host: definition only
])
def test_owner_decisions(facts, expected):
    assert choose("h1", facts) == expected


def test_owner_down_or_without_cluster_api_is_a_clear_refusal():
    down = choose("h1", OwnerFacts("h2", False, "", True))
    assert isinstance(down, Unavailable) and down.host == "h2" and "h2" in down.message
    silent = choose("h1", OwnerFacts("h2", True, "", True))
    assert isinstance(silent, Unavailable) and "api_port" in silent.message


# --- a fake cluster store ----------------------------------------------------------------
class FakeKv:
    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    def get(self, key: str) -> KeyValue | None:
        value = self.items.get(key)
        return KeyValue(key, value, 1, 1) if value is not None else None


class FakeStore:
    def __init__(self) -> None:
        self.keys = Keys("/parvisor/t/")
        self.kv = FakeKv()
        self.vms: dict[str, SimpleNamespace] = {}

    def get_vm(self, name: str):
        if name not in self.vms:
            raise NotFound(f"no VM named '{name}'")
        return self.vms[name]

    def add_vm(self, name: str, owner: str | None, state: VmState = VmState.RUNNING) -> None:
        record = SimpleNamespace(uuid=str(uuid.uuid4()), name=name, state=state)
        self.vms[name] = record
        if owner:
            self.kv.items[self.keys.owner(record.uuid)] = json.dumps(
                {"host": owner, "phase": "run"}).encode()

    def add_member(self, host: str, api_url: str) -> None:
        self.kv.items[self.keys.member(host)] = json.dumps(
            {"name": host, "api_url": api_url}).encode()


# --- real servers ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A uvicorn server in a thread, stopped by the test."""

    def __init__(self, app, lifespan: str = "off", **tls) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan=lifespan,
                                                    **tls))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start in 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def owner_app() -> FastAPI:
    """What an owner's cluster API answers; it records what it was sent."""
    app = FastAPI()
    app.state.seen = []
    api_app._install_error_handlers(app)
    api_app._install_token_auth(app, (TOKEN,))

    @app.post("/v1/vms/{name}/pause")
    async def pause(name: str, request: Request):
        app.state.seen.append(dict(request.headers))
        return {"vm": {"name": name, "state": "paused"}, "query": dict(request.query_params)}

    @app.post("/v1/vms/{name}/exec")
    async def exec_(name: str, request: Request):
        body = await request.json()
        raise Busy(f"VM '{name}' refuses {body['argv'][0]}", vm=name)

    @app.post("/v1/vms/{name}/save")
    async def slow(name: str):
        await asyncio.sleep(HANGING_S)          # an owner that never answers in time
        return {"saved": name}

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str):
        return {"id": job_id, "status": "succeeded"}

    @app.websocket("/v1/vms/{name}/console")
    async def console(websocket: WebSocket, name: str):
        await websocket.accept()
        while True:
            data = await websocket.receive_bytes()
            await websocket.send_bytes(b"owner:" + data)

    return app


def front_app(forwarder: Forwarder) -> FastAPI:
    """The host the user talks to: anything it serves itself says 'local'."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await forwarder.close()      # its kept-alive connections to the owner
    app = FastAPI(lifespan=lifespan)
    app.add_middleware(ForwardingMiddleware, forwarder=forwarder)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PATCH", "DELETE"])
    async def local(rest: str):
        return {"served": "local", "path": rest}

    return app


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(directory, "t")
    server = certs.issue(ca, directory, "api-127.0.0.1", server=True, hosts=("127.0.0.1",))
    other = certs.make_ca(directory / "other", "other")
    stranger = certs.issue(other, directory / "other", "api-127.0.0.1", server=True,
                           hosts=("127.0.0.1",))
    return SimpleNamespace(ca=ca, server=server, stranger=stranger)


@pytest.fixture(scope="module")
def owner(pki):
    app = owner_app()
    server = Server(app, ssl_certfile=str(pki.server.cert), ssl_keyfile=str(pki.server.key),
                    timeout_graceful_shutdown=1)
    server.app = app
    yield server
    server.stop()


@pytest.fixture()
def cluster(pki, owner):
    import ssl
    store = FakeStore()
    store.add_member("h1", f"https://127.0.0.1:{owner.port}")
    forwarder = Forwarder("h2", store, TOKEN, ssl.create_default_context(cafile=str(pki.ca.cert)))
    front = Server(front_app(forwarder), lifespan="on")
    yield SimpleNamespace(store=store, url=f"http://127.0.0.1:{front.port}", owner=owner)
    front.stop()


def test_owner_answers_are_returned_unchanged(cluster):
    cluster.store.add_vm("web", owner="h1")
    answer = httpx.post(f"{cluster.url}/v1/vms/web/pause?x=1",
                        headers={"Authorization": "Bearer user-token"})
    assert answer.status_code == 200
    assert answer.json() == {"vm": {"name": "web", "state": "paused"}, "query": {"x": "1"}}
    sent = cluster.owner.app.state.seen[-1]
    # the owner got the cluster token (never the user's) and the loop guard naming h2
    assert sent["authorization"] == f"Bearer {TOKEN}" and sent[FORWARDED_HEADER] == "h2"
    refused = httpx.post(f"{cluster.url}/v1/vms/web/exec", json={"argv": ["uname"]})
    assert refused.status_code == 409
    assert refused.json()["error"]["message"] == "VM 'web' refuses uname"


def test_requests_that_need_no_owner_are_served_here(cluster):
    cluster.store.add_vm("web", owner="h1")
    cluster.store.add_vm("mine", owner="h2")
    cluster.store.add_vm("idle", owner=None, state=VmState.OFF)
    for method, path in [("GET", "/v1/vms/web"), ("POST", "/v1/vms/web/start"),
                         ("POST", "/v1/vms/mine/pause"), ("POST", "/v1/vms/idle/pause"),
                         ("POST", "/v1/vms/nosuch/pause")]:
        assert httpx.request(method, cluster.url + path).json()["served"] == "local", path
    looped = httpx.post(f"{cluster.url}/v1/vms/web/pause", headers={FORWARDED_HEADER: "h3"})
    assert looped.json()["served"] == "local"


def test_jobs_are_asked_of_the_host_named_in_their_id(cluster):
    assert httpx.get(f"{cluster.url}/v1/jobs/job-h1-4").json() == {
        "id": "job-h1-4", "status": "succeeded"}
    assert httpx.get(f"{cluster.url}/v1/jobs/job-h2-4").json()["served"] == "local"


def test_owner_down_gives_503_naming_it_at_once(cluster):
    cluster.store.add_vm("lost", owner="h9")            # h9: no membership key
    started = time.monotonic()
    answer = httpx.post(f"{cluster.url}/v1/vms/lost/pause")
    assert answer.status_code == 503 and "h9" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 2.0             # no network wait at all


def test_owner_unreachable_gives_503_within_the_connect_timeout(cluster):
    from parvisor.api.forward import CONNECT_TIMEOUT_S
    cluster.store.add_member("h3", f"https://127.0.0.1:{_free_port()}")   # nobody listens
    cluster.store.add_vm("far", owner="h3")
    started = time.monotonic()
    answer = httpx.post(f"{cluster.url}/v1/vms/far/pause", timeout=30)
    assert answer.status_code == 503
    assert "h3" in answer.json()["error"]["message"]
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 2.0    # margin: a loaded box


def test_owner_leaving_the_cluster_mid_request_gives_503_not_a_hang(cluster):
    from parvisor.api.forward import OWNER_CHECK_EVERY_S
    cluster.store.add_vm("web", owner="h1")
    member_key = cluster.store.keys.member("h1")
    threading.Timer(0.5, cluster.store.kv.items.pop, (member_key,)).start()  # lease expiry
    started = time.monotonic()
    answer = httpx.post(f"{cluster.url}/v1/vms/web/save", timeout=HANGING_S)
    waited = time.monotonic() - started
    assert answer.status_code == 503 and "left the cluster" in answer.json()["error"]["message"]
    assert waited < 0.5 + OWNER_CHECK_EVERY_S + 2.0, waited      # margin: a loaded box


def test_an_owner_certificate_from_another_ca_is_refused(cluster, pki):
    impostor = Server(owner_app(), ssl_certfile=str(pki.stranger.cert),
                      ssl_keyfile=str(pki.stranger.key))
    try:
        cluster.store.add_member("h4", f"https://127.0.0.1:{impostor.port}")
        cluster.store.add_vm("spoofed", owner="h4")
        answer = httpx.post(f"{cluster.url}/v1/vms/spoofed/pause")
        assert answer.status_code == 503 and "CERTIFICATE_VERIFY_FAILED" in answer.text
    finally:
        impostor.stop()


def test_console_websocket_is_relayed_to_the_owner(cluster):
    from websockets.asyncio.client import connect
    cluster.store.add_vm("web", owner="h1")

    async def talk() -> bytes:
        url = cluster.url.replace("http://", "ws://") + "/v1/vms/web/console"
        async with connect(url, open_timeout=5) as ws:
            await ws.send(b"uname\n")
            return await asyncio.wait_for(ws.recv(), 5)
    assert asyncio.run(talk()) == b"owner:uname\n"


def test_console_of_a_vm_on_a_down_host_is_refused(cluster):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus
    cluster.store.add_vm("lost", owner="h9")

    async def talk() -> None:
        url = cluster.url.replace("http://", "ws://") + "/v1/vms/lost/console"
        async with connect(url, open_timeout=5):
            pass
    with pytest.raises(InvalidStatus):
        asyncio.run(talk())


# --- where the forwarder sits in the real API app -----------------------------------------
class RecordingForwarder:
    """Records what it was asked and serves everything here."""

    def __init__(self) -> None:
        self.asked: list = []

    async def decide(self, route):
        self.asked.append(route)
        return Local()


def test_auth_is_checked_before_anything_is_forwarded(tmp_path):
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from parvisor.api.app import create_app
    from parvisor.config import load_config
    from parvisor.service import HostService
    service = HostService(load_config(tmp_path / "s"))
    try:
        service.forwarder = RecordingForwarder()
        client = TestClient(create_app(service, tokens=("s3cret",)))
        assert client.post("/v1/vms/web/pause",
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/vms/web/console") as ws:
                ws.receive_bytes()
        assert service.forwarder.asked == []
        answer = client.post("/v1/vms/web/pause", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 404          # served here: no such VM
        assert service.forwarder.asked == [VmRoute("web")]
        # the web console's listener: no session, no forwarding
        console = TestClient(create_app(service, console=True))
        assert console.post("/v1/vms/web/pause").status_code == 401
        assert service.forwarder.asked == [VmRoute("web")]
    finally:
        service.store.close()
