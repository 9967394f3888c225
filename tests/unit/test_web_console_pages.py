"""The console's new pages at API level on a standalone host: the real app (console
listener: guard, sessions) and the real manager on a temporary state dir, no QEMU.

The cluster page reads ``cluster`` from the session answer and shows "standalone" when
it is null; cluster routes answer 409 there. The disks page lists images from
``GET /v1/disks``; the VM page's charts sample ``GET /v1/vms/NAME/stats``."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from parvisor.api.app import create_app
from parvisor.api.inventory_routes import nic_counters, process_rss_bytes
from parvisor.config import load_config
from parvisor.service import HostService
from parvisor.web.auth import Role, make_user

TOKEN = "unit-token-0123456789"


@pytest.fixture
def service(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    (state / "config.toml").write_text(f'api_tokens = ["{TOKEN}"]\n')
    svc = HostService(load_config(state))
    (svc.config.storage_roots[0] / "vmlinuz").write_bytes(b"not really a kernel")
    yield svc
    svc.store.close()


@pytest.fixture
def console(service):
    from parvisor.web import USERS_FILE
    from parvisor.web.auth import UsersFile
    UsersFile(service.config.state_dir / USERS_FILE).save(
        {"vic": make_user("vic", "viewer-pass-1", Role.VIEWER)})
    return TestClient(create_app(service, console=True),
                      headers={"authorization": f"Bearer {TOKEN}"})


def test_standalone_host_says_so(console, service):
    session = console.get("/ui/api/session").json()
    assert session["cluster"] is None and session["host"] == service.config.host_name
    refused = console.get("/v1/cluster")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "not_a_cluster_member"
    assert console.post("/v1/cluster/hosts/h1/drain").status_code == 409
    assert console.get("/v1/vms/x/migration").status_code == 409
    page = console.get("/ui/cluster")
    assert page.status_code == 200 and "app.js" in page.text
    for path in ("/ui/switches", "/ui/disks"):
        assert console.get(path).status_code == 200


def test_disk_list_shows_images_with_their_users(console, service):
    root = service.config.storage_roots[0]
    made = console.post("/v1/disks", json={"path": str(root / "data.qcow2"), "size": "16M"})
    assert made.status_code == 201, made.text
    (root / "notes.txt").write_text("not an image")
    (root / "link.qcow2").symlink_to(root / "data.qcow2")
    vm = console.post("/v1/vms", json={"name": "d1", "kernel": str(root / "vmlinuz"),
                                       "disks": [{"path": str(root / "data.qcow2")}]})
    assert vm.status_code == 201, vm.text
    listing = console.get("/v1/disks").json()
    assert listing["roots"] == [str(root)] and listing["truncated"] is False
    by_path = {d["path"]: d for d in listing["disks"]}
    assert set(by_path) == {str(root / "data.qcow2")}     # no text file, no symlink
    entry = by_path[str(root / "data.qcow2")]
    assert entry["format"] == "qcow2" and entry["used_by"] == ["d1"]
    assert entry["file_bytes"] > 0


def test_stats_of_a_stopped_vm_and_of_an_unknown_one(console, service):
    root = service.config.storage_roots[0]
    console.post("/v1/vms", json={"name": "s1", "kernel": str(root / "vmlinuz"),
                                  "memory": "128M"})
    stats = console.get("/v1/vms/s1/stats").json()
    assert stats["state"] == "off" and stats["running"] is False
    assert stats["cpu_seconds"] is None and stats["memory_bytes"] == 128 << 20
    missing = console.get("/v1/vms/nope/stats")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_viewer_may_read_the_new_pages_data_but_not_change_anything(service, console):
    viewer = TestClient(create_app(service, console=True))
    login = viewer.post("/ui/api/login", json={"user": "vic", "password": "viewer-pass-1"})
    assert login.status_code == 200
    csrf = login.json()["csrf"]
    assert viewer.get("/v1/disks").status_code == 200
    assert viewer.get("/v1/switches").status_code == 200
    root = service.config.storage_roots[0]
    for method, path, body in (
            ("POST", "/v1/switches", {"name": "sw1", "type": "private"}),
            ("POST", "/v1/disks", {"path": str(root / "v.qcow2"), "size": "1M"}),
            ("POST", "/v1/vms/x/checkpoints", {"name": "c1"}),
            ("POST", "/v1/vms/x/nics", {"switch": "sw1"}),
            ("POST", "/v1/cluster/hosts/h1/drain", None)):
        answer = viewer.request(method, path, json=body, headers={"x-csrf-token": csrf})
        assert answer.status_code == 403, (path, answer.text)
    assert not (root / "v.qcow2").exists()
    assert console.get("/v1/switches").json() == []


def test_counter_readers(tmp_path):
    stats = tmp_path / "pvtap" / "statistics"
    stats.mkdir(parents=True)
    for name, value in (("tx_bytes", 10), ("rx_bytes", 20), ("tx_packets", 1)):
        (stats / name).write_text(f"{value}\n")
    # the tap's transmit is the guest's receive
    assert nic_counters("nic0", "pvtap", sys_net=tmp_path) == {
        "id": "nic0", "receive_bytes": 10, "transmit_bytes": 20, "receive_packets": 1,
        "transmit_packets": None}
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tqemu\nVmRSS:\t  2048 kB\n")
    assert process_rss_bytes(42, proc=tmp_path) == 2 << 20
    assert process_rss_bytes(43, proc=tmp_path) is None
