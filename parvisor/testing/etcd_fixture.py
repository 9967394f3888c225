"""Real etcd members for tests, on 127.0.0.1 with free ports and a private data dir.

What for: the store contract test and the etcd integration tests start one or three
``etcd`` processes (Debian's etcd-server 3.4), kill and restart members by PID, and
stop everything by PID at the end. Never: touch an etcd this fixture did not start,
stop processes by name, or sleep blindly (every wait polls a condition with a timeout).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles, op_put

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    def __init__(self, base_dir: Path, size: int = 1, tls: TlsFiles | None = None,
                 server_cert: TlsFiles | None = None) -> None:
        self.base_dir = base_dir
        self.token = f"parvisor-test-{uuid.uuid4().hex[:8]}"
        self.tls = tls                     # client side
        self.server_cert = server_cert     # ca + server cert/key: enables client-cert auth
        scheme = "https" if server_cert else "http"
        self.members = [Member(f"m{i}", free_port(), free_port(), base_dir / f"m{i}",
                               scheme=scheme) for i in range(1, size + 1)]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def kv(self, timeout_s: float = 2.0, members: list[Member] | None = None) -> EtcdKV:
        chosen = members or self.members
        return EtcdKV([m.client_url for m in chosen], timeout_s=timeout_s, tls=self.tls)

    def _argv(self, member: Member, state: str) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
                "--listen-client-urls", member.client_url,
                "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url,
                "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token,
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--logger", "zap", "--log-level", "warn"]
        if self.server_cert:
            argv += ["--cert-file", self.server_cert.cert, "--key-file", self.server_cert.key,
                     "--client-cert-auth", "--trusted-ca-file", self.server_cert.ca]
        return argv

    def start(self, timeout_s: float = 20.0) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            self.start_member(member, state="new")
        wait_until(self.writable, timeout_s, "etcd to accept writes")

    def start_member(self, member: Member, state: str = "existing") -> None:
        log = open(self.base_dir / f"{member.name}.log", "ab")
        member.proc = subprocess.Popen(self._argv(member, state), stdout=log, stderr=log,
                                       start_new_session=True)
        log.close()

    def kill_member(self, member: Member) -> None:
        """SIGKILL one member by its PID and reap it."""
        if member.proc is not None and member.proc.poll() is None:
            os.kill(member.proc.pid, signal.SIGKILL)
            member.proc.wait(timeout=10)
        member.proc = None

    def writable(self, members: list[Member] | None = None) -> bool:
        try:
            ok, _, _ = self.kv(1.0, members).txn([], [op_put("/fixture/probe", "1")])
            return ok
        except ClusterUnavailable:
            return False

    def leader(self) -> Member | None:
        for member in self.members:
            if member.proc is None:
                continue
            try:
                status = self.kv(1.0, [member]).status()
            except ClusterUnavailable:
                continue
            if status.get("leader") and status.get("leader") == status["header"].get("member_id"):
                return member
        return None

    def close(self) -> None:
        for member in self.members:
            self.kill_member(member)
