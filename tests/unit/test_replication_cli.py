"""``parvisor vm replication …`` and its REST routes: what the CLI sends and shows, how
the API validates bodies and maps refusals, and which replication requests any cluster
member answers (the requests themselves: test_replication_requests.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from parvisor.api import replication_routes
from parvisor.api.app import create_app
from parvisor.api.forward import FORWARDED_HEADER, Forward, Local, VmRoute, route_of
from parvisor.cli import replication_commands
from parvisor.cli.main import app
from parvisor.cluster.etcd_kv import KeyValue
from parvisor.replication.requests import FailoverRefused
from parvisor.store.etcd import Keys

STATUS = {
    "vm_name": "web", "mode": "async", "interval_s": 300, "primary": "h1", "replica": "h3",
    "generation": 2, "state": "broken", "reason": "replica unreachable",
    "bytes_behind": 3 << 20, "last_consistent_point": "2027-01-15T08:00:00Z",
    "rpo_s": 620.4, "failover_allowed": False, "stall_limit_s": 5.0,
    "failover": "replica on h3 is broken since 2027-01-15T08:00:00Z: failover would lose "
                "every write after it; refused unless forced (replication failover --force)",
    "protection": "not protected: replica on h3 is broken", "primary_up": True,
    "replica_up": False, "progress_percent": None,
    "disks": [{"id": "d0", "primary_path": "/var/lib/parvisor/images/[web].qcow2",
               "replica_path": None, "export": None}]}


class FakeApi:
    def __init__(self, answer=None) -> None:
        self.calls: list[tuple] = []
        self.answer = answer or STATUS

    def get(self, path, **_):
        self.calls.append(("GET", path, None))
        return self.answer

    def post(self, path, body=None, **_):
        self.calls.append(("POST", path, body))
        return self.answer

    def request(self, method, path, **_):
        self.calls.append((method, path, None))
        return self.answer


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(replication_commands, "client", lambda: fake)
    return fake


def run(*args: str):
    return CliRunner().invoke(app, ["vm", "replication", *args])


# --- CLI ---------------------------------------------------------------------------------
def test_status_shows_what_a_failover_would_lose(api):
    rows = dict(replication_commands.status_rows(STATUS))
    assert rows["mode"] == "async, every 300 s" and rows["replica"] == "h3 (down)"
    assert rows["state"] == "broken: replica unreachable" and rows["bytes behind"] == "3M"
    assert rows["last consistent"] == "2027-01-15T08:00:00Z" and rows["RPO"] == "620 s"
    assert rows["failover"].startswith("refused: replica on h3 is broken")
    assert rows["disk d0"] == "/var/lib/parvisor/images/[web].qcow2 -> (not created yet)"
    done = run("status", "web")
    assert done.exit_code == 0, done.output
    for label, _ in replication_commands.status_rows(STATUS):
        assert label in done.output
    assert "[web]" in done.output            # a path is printed as is, never as markup
    assert api.calls == [("GET", "/vms/web/replication", None)]


def test_status_json_is_the_api_object(api):
    done = run("status", "web", "--json")
    assert done.exit_code == 0 and json.loads(done.output) == STATUS


def test_sync_in_sync_rpo_reads_as_no_loss():
    rows = dict(replication_commands.status_rows({**STATUS, "mode": "sync", "rpo_s": 0.0,
                                                  "state": "in-sync", "reason": ""}))
    assert rows["RPO"].startswith("0 (no acknowledged write lost)")
    assert rows["stall limit"] == "5 s" and rows["state"] == "in-sync"


def test_enable_sends_only_the_given_options(api):
    assert run("enable", "web", "--mode", "async", "--interval", "30s").exit_code == 0
    assert run("enable", "web", "--mode", "sync", "--to", "h3",
               "--stall-limit", "2.5").exit_code == 0
    assert api.calls == [
        ("POST", "/vms/web/replication", {"mode": "async", "interval": "30s"}),
        ("POST", "/vms/web/replication", {"mode": "sync", "to": "h3", "stall_limit_s": 2.5})]
    assert run("enable", "web", "--mode", "mirror").exit_code != 0
    assert len(api.calls) == 2


def test_failover_takes_one_flag_and_disable_deletes(api):
    assert run("failover", "web", "--force").exit_code == 0
    assert api.calls[-1] == ("POST", "/vms/web/replication/failover",
                             {"force": True, "planned": False, "test": False,
                              "test_stop": False})
    two = run("failover", "web", "--planned", "--test")
    assert two.exit_code != 0 and "--planned, --test" in two.output
    assert run("disable", "web").exit_code == 0
    assert api.calls[-1] == ("DELETE", "/vms/web/replication", None)


# --- API ---------------------------------------------------------------------------------
class FakeRequests:
    calls: list[tuple] = []
    members: dict[str, bytes] = {}

    def __init__(self, vms) -> None:
        self.keys = Keys("/parvisor/t/")
        self.kv = SimpleNamespace(get=lambda key: (
            KeyValue(key, self.members[key], 1, 1) if key in self.members else None))

    def acting_host(self, name, *, planned, test, test_stop):
        return "h1" if planned else "h3" if test or test_stop else None

    def enable(self, *args):
        self.calls.append(("enable", *args))
        return {"vm_name": args[0]}

    def status(self, name):
        return {"vm_name": name}

    def disable(self, name):
        self.calls.append(("disable", name))
        return {"vm_name": name}

    async def failover(self, name, **flags):
        if flags["force"]:
            raise FailoverRefused("primary h1 is running: use --planned", vm=name)
        self.calls.append(("failover", name, flags))
        return {"vm_name": name}


class FakeForwarder:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    async def decide(self, route):       # the middleware: failover routes stay here
        assert route is None
        return Local()

    def headers(self, incoming):
        return {FORWARDED_HEADER: "h2"}

    async def request(self, target, method, path, headers, body):
        self.sent.append((target, method, path, json.loads(body)))
        return httpx.Response(409, json={"error": {"code": "wrong_state", "message": "x",
                                                   "details": {}}})


@pytest.fixture
def service(monkeypatch):
    FakeRequests.calls, FakeRequests.members = [], {}
    monkeypatch.setattr(replication_routes, "ReplicationRequests", FakeRequests)
    return SimpleNamespace(vms=SimpleNamespace(config=SimpleNamespace(host_name="h2")),
                           forwarder=None)


@pytest.fixture
def http(service):
    return TestClient(create_app(service))


def test_enable_body_is_validated(http):
    ok = http.post("/v1/vms/web/replication", json={"mode": "async", "interval": "15m",
                                                    "to": "h2", "stall_limit_s": 4})
    assert ok.status_code == 201
    assert FakeRequests.calls == [("enable", "web", "async", "15m", "h2", 4.0)]
    for body, field in (({"mode": "async", "interval": "1h"}, "interval"),
                        ({"mode": "both"}, "mode"), ({}, "mode"),
                        ({"mode": "sync", "stall_limit_s": 0}, "stall_limit_s"),
                        ({"mode": "sync", "to": "../h2"}, "to"),
                        ({"mode": "sync", "extra": 1}, "extra")):
        bad = http.post("/v1/vms/web/replication", json=body)
        assert bad.status_code == 400, body
        assert bad.json()["error"]["message"].startswith(field)
    assert len(FakeRequests.calls) == 1


def test_failover_flags_and_refusals_over_http(http):
    assert http.post("/v1/vms/web/replication/failover").status_code == 200
    assert http.post("/v1/vms/web/replication/failover",        # standalone-style:
                     json={"planned": True}).status_code == 200  # no forwarder
    assert [c[2] for c in FakeRequests.calls] == [
        {"force": False, "planned": False, "test": False, "test_stop": False},
        {"force": False, "planned": True, "test": False, "test_stop": False}]
    refused = http.post("/v1/vms/web/replication/failover", json={"force": True})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "failover_refused"
    assert http.delete("/v1/vms/web/replication").status_code == 200
    assert http.get("/v1/vms/web/replication").json() == {"vm_name": "web"}


def test_planned_and_test_failover_are_carried_out_by_the_acting_host(service):
    service.forwarder = FakeForwarder()
    FakeRequests.members[Keys("/parvisor/t/").member("h1")] = json.dumps(
        {"api_url": "https://10.0.0.1:8444"}).encode()
    http = TestClient(create_app(service), raise_server_exceptions=False)
    planned = http.post("/v1/vms/web/replication/failover", json={"planned": True})
    assert planned.status_code == 409 and planned.json()["error"]["code"] == "wrong_state"
    assert service.forwarder.sent == [(Forward("h1", "https://10.0.0.1:8444"), "POST",
                                       "/v1/vms/web/replication/failover",
                                       {"planned": True})]
    # the replica h3 is down: a clear 503 naming it, nothing sent
    test = http.post("/v1/vms/web/replication/failover", json={"test": True})
    assert test.status_code == 503 and "h3" in test.json()["error"]["message"]
    # forwarded to us already, or nothing to forward: carried out here
    again = http.post("/v1/vms/web/replication/failover", json={"planned": True},
                      headers={FORWARDED_HEADER: "h2"})
    assert again.status_code == 200 and len(service.forwarder.sent) == 1
    assert http.post("/v1/vms/web/replication/failover", json={}).status_code == 200
    assert [c[2]["planned"] for c in FakeRequests.calls] == [True, False]


def test_a_standalone_host_answers_409():
    standalone = SimpleNamespace(vms=SimpleNamespace(store=SimpleNamespace(),
                                                     config=SimpleNamespace(host_name="h")))
    answer = TestClient(create_app(standalone)).get("/v1/vms/web/replication")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "not_a_cluster_member"


@pytest.mark.parametrize("method, path, expected", [
    ("POST", "/v1/vms/web/replication", VmRoute("web")),     # reads the owner's disks
    ("GET", "/v1/vms/web/replication", None),                # etcd only: any member
    ("DELETE", "/v1/vms/web/replication", None),
    ("POST", "/v1/vms/web/replication/failover", None),      # the owner may be down
])
def test_which_replication_requests_go_to_the_owner(method, path, expected):
    assert route_of("http", method, path, {}) == expected
