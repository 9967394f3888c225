"""The REST API's contract: committed OpenAPI document, error shape, bad input.

Runs the real app and the real manager on a temporary state dir (no QEMU needed: every
request here is refused or only touches the store)."""

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from parvisor.api.openapi import render
from parvisor.config import load_config
from parvisor.service import HostService
from parvisor.api.app import create_app

OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"


def test_openapi_document_is_committed_and_current():
    if os.environ.get("PARVISOR_REWRITE_GOLDEN"):
        OPENAPI.write_text(render())
    assert OPENAPI.exists(), "docs/openapi.json is missing: python -m parvisor.api.openapi"
    assert OPENAPI.read_text() == render(), (
        "the API changed: review, then PARVISOR_REWRITE_GOLDEN=1 to rewrite docs/openapi.json")


@pytest.fixture
def service(tmp_path):
    state = tmp_path / "s"
    svc = HostService(load_config(state))
    kernel = svc.config.storage_roots[0] / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    yield svc
    svc.store.close()


@pytest.fixture
def api(service):
    return TestClient(create_app(service))


def create(api, service, name="web1", **extra):
    body = {"name": name, "kernel": str(service.config.storage_roots[0] / "vmlinuz"), **extra}
    return api.post("/v1/vms", json=body)


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["message"]
    return error


def test_create_show_list_edit(api, service):
    vm = create(api, service, memory="512M", vcpus=2).json()
    assert vm["state"] == "off" and vm["memory_bytes"] == 512 << 20 and vm["vcpus"] == 2
    assert vm["host"] == service.config.host_name and vm["accelerator"] in ("kvm", "tcg")
    for key in ("name", "uuid", "state", "host", "vcpus", "max_vcpus", "memory_bytes",
                "max_memory_bytes", "disks", "nics", "ha", "heartbeat", "ip_addresses"):
        assert key in vm
    assert [v["name"] for v in api.get("/v1/vms").json()] == ["web1"]
    edited = api.patch("/v1/vms/web1", json={"vcpus": 3, "notes": "db"}).json()
    assert edited["vcpus"] == 3 and edited["notes"] == "db" and edited["max_vcpus"] >= 3


@pytest.mark.parametrize("body,status,code", [
    ({"name": "a/b"}, 400, "invalid_input"),
    ({"name": "x\x01"}, 400, "invalid_input"),
    ({"name": "../x"}, 400, "invalid_input"),
    ({"memory": "12XB"}, 400, "invalid_input"),
    ({"memory": "-1G"}, 400, "invalid_input"),
    ({"vcpus": -1}, 400, "invalid_input"),
    ({"vcpus": 10**30}, 400, "invalid_input"),
    ({"vcpus": 8, "max_vcpus": 4}, 400, "invalid_input"),
    ({"colour": "red"}, 400, "invalid_input"),
    ({"kernel": "/nonexistent/vmlinuz"}, 400, "invalid_input"),
    ({"kernel": "/etc/passwd"}, 400, "invalid_input"),
    ({"disk": "/etc/passwd", "kernel": None}, 400, "invalid_input"),
])
def test_bad_create_requests_are_refused_and_change_nothing(api, service, body, status, code):
    payload = {"name": "ok1", "kernel": str(service.config.storage_roots[0] / "vmlinuz"),
               **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    error = error_of(api.post("/v1/vms", json=payload), status)
    assert error["code"] == code
    assert api.get("/v1/vms").json() == []


def test_symlink_escaping_the_storage_root_is_refused(api, service):
    link = service.config.storage_roots[0] / "escape"
    link.symlink_to("/etc")
    error = error_of(create(api, service, kernel=str(link / "passwd")), 400)
    assert "outside the storage roots" in error["message"]


def test_malformed_json_and_wrong_content(api):
    error_of(api.post("/v1/vms", content=b"{not json",
                      headers={"content-type": "application/json"}), 400)
    error_of(api.post("/v1/vms", content=b"", headers={"content-type": "application/json"}),
             400)
    error_of(api.post("/v1/vms", json=[1, 2]), 400)
    deep = {"name": "x"}
    for _ in range(200):
        deep = {"n": deep}
    error_of(api.post("/v1/vms", json=deep), 400)


def test_duplicate_name_is_409(api, service):
    create(api, service)
    assert error_of(create(api, service), 409)["code"] == "already_exists"


def test_unknown_vm_is_404(api):
    assert error_of(api.get("/v1/vms/nope"), 404)["code"] == "not_found"
    assert error_of(api.post("/v1/vms/nope/start"), 404)["code"] == "not_found"


@pytest.mark.parametrize("action", ["pause", "resume", "shutdown", "save", "restore", "exec"])
def test_actions_in_the_wrong_state_name_the_state(api, service, action):
    create(api, service)
    body = {"argv": ["true"]} if action == "exec" else None
    error = error_of(api.post(f"/v1/vms/web1/{action}", json=body), 409)
    assert error["code"] == "wrong_state" and error["details"]["current_state"] == "off"
    assert api.get("/v1/vms/web1").json()["state"] == "off"


def test_edit_validation(api, service):
    create(api, service)
    error_of(api.patch("/v1/vms/web1", json={}), 400)
    error_of(api.patch("/v1/vms/web1", json={"memory": "lots"}), 400)
    error_of(api.patch("/v1/vms/web1", json={"max_vcpus": 1, "vcpus": 2}), 400)
    assert api.get("/v1/vms/web1").json()["vcpus"] == 1


def test_token_auth_on_tcp_app(service):
    client = TestClient(create_app(service, tokens=("s3cret",)))
    assert error_of(client.get("/v1/vms"), 401)["code"] == "unauthorized"
    assert client.get("/v1/vms", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/vms", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_events_record_creation(api, service):
    create(api, service)
    kinds = [e["kind"] for e in api.get("/v1/events", params={"vm": "web1"}).json()]
    assert kinds == ["created"]
