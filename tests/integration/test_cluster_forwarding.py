"""Any host serves the whole cluster: in a real 2-host lab (netns, etcd with TLS, a host
service per host), a tiny VM runs on h1 and h2's CLI — which talks to h2's service only —
runs a command in its guest, pauses and resumes it, reads its console log and creates a
checkpoint, each carried out on h1 (h2 forwards to h1's cluster API: TLS from the cluster
CA, the cluster token). h1's cluster API refuses a wrong token or none (401).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import ssl
import time

import httpx
import pytest

from parvisor.cli.client import ApiClient
from parvisor.cluster.settings import CLUSTER_API_PORT
from parvisor.errors import ParvisorError
from parvisor.testing.lab_fixture import running_lab

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("ip") is None,
                                reason="needs etcd-server and iproute2 (root)")


@pytest.fixture(scope="module")
def lab(tiny_image):
    with running_lab(2) as lab:
        yield lab


def _h1(lab) -> ApiClient:
    """h1's own API over its unix socket: checks what happened on h1 without paying for a
    CLI start inside the lab (seconds each on a loaded 2-core box)."""
    return ApiClient(lab.lab.state_dir("h1"))


def _guest_answers(h1: ApiClient) -> bool:
    try:
        return h1.post("/vms/fw1/exec", {"argv": ["true"], "timeout_s": 5})["exit_code"] == 0
    except ParvisorError:
        return False


def test_h2_acts_on_a_vm_running_on_h1(lab):
    h1 = _h1(lab)
    lab.on("h1", "vm", "create", "fw1", "--image", "tiny", "--memory", "128M",
           "--disk-size", "32M", "--preferred-hosts", "h1")
    vm_uuid = h1.get("/vms/fw1")["uuid"]
    h1.post("/vms/fw1/start")
    lab.wait(lambda: lab.running_on(vm_uuid) == ["h1"], 30, "fw1 to run on h1")
    lab.wait(lambda: _guest_answers(h1), 90, "the guest agent of fw1 on h1", interval=0.5)

    # each command below runs in h2 and talks to h2's service only
    uname = lab.on("h2", "vm", "exec", "fw1", "--", "uname", "-r").stdout
    assert re.match(r"\d+\.\d+", uname.strip()), uname
    assert uname == h1.post("/vms/fw1/exec", {"argv": ["uname", "-r"]})["stdout"]

    lab.on("h2", "vm", "pause", "fw1")
    assert h1.get("/vms/fw1")["state"] == "paused"
    lab.on("h2", "vm", "resume", "fw1")
    assert h1.get("/vms/fw1")["state"] == "running"

    # the console log lives in h1's state dir (h2 has none): h2 returns h1's
    assert "guest agent started" in lab.on("h2", "vm", "console", "fw1", "--log").stdout

    # a job on h1, followed by h2's CLI through h2 (its id names h1)
    lab.on("h2", "vm", "checkpoint", "create", "fw1", "from-h2")
    listed = h1.get("/vms/fw1/checkpoints")["checkpoints"]
    assert [c["name"] for c in listed] == ["from-h2"]

    # the serial console through h2's socket (what `vm console` opens), relayed to h1
    assert _console_answer(lab, "h2", b"echo fw-$((6*7))\n", b"fw-42")
    assert lab.running_on(vm_uuid) == ["h1"]         # nothing moved on the way


def _console_answer(lab, host: str, typed: bytes, expected: bytes, timeout: float = 30) -> bool:
    from websockets.sync.client import unix_connect
    socket_path = lab.lab.state_dir(host) / "run" / "api.sock"
    seen = b""
    with unix_connect(str(socket_path), "ws://parvisor/v1/vms/fw1/console",
                      open_timeout=10) as ws:
        ws.send(typed)
        deadline = time.monotonic() + timeout
        while expected not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {expected!r} on the console in {timeout:g} s: "
                                     f"{seen[-300:]!r}")
            with contextlib.suppress(TimeoutError):
                seen += ws.recv(timeout=left)
    return True


def test_cluster_api_refuses_a_wrong_token(lab):
    h1 = lab.lab.state().nodes["h1"]
    url = f"https://{h1.ip}:{CLUSTER_API_PORT}/v1/vms"
    verify = ssl.create_default_context(cafile=str(lab.lab.pki / "ca.crt"))
    with httpx.Client(verify=verify, timeout=10) as client:
        wrong = client.get(url, headers={"Authorization": "Bearer not-the-cluster-token"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "unauthorized"
        assert client.get(url).status_code == 401
