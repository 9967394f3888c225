"""The cluster admin commands end to end, as a new user runs them (docs/cluster.md
"Create a cluster"): hosts ``a`` and ``b`` and a witness ``w``, each a network
namespace on a private bridge with its own state dir; real etcd members with TLS, real
host services (no QEMU is started).

Walk: a standalone VM on b; ``cluster create`` on a (CA + etcd certificates, the
printed member commands); the pki copied to b and w; ``cluster join`` refused while
etcd is down and while b's service runs (config.toml and the SQLite database
untouched); each member started with the command ``create`` printed (``cluster witness
serve``, w's is the witness); ``cluster join`` on a and b (b's VM moves into etcd);
services started; a's ``vm list`` shows b's VM; ``cluster status --json`` shows both
hosts as members with lease age and TTL, quorum and three voting members; etcd refuses
a client without a certificate; ``cluster leave`` on b: its VMs stay in the cluster,
b's registration is gone, b restarts standalone and empty. ``cluster create`` twice
is refused with the CA unchanged.

Cleanup: every process by PID (recorded + any found in the namespaces), namespaces,
links, bridge, state dirs.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles
from parvisor.lab import net
from parvisor.testing.guest_fixtures import short_state_dir, test_image_dir
from parvisor.testing.host_fixture import PARVISOR, wait_for

TTL_S = 8.0       # the [cluster] default lease TTL


@dataclass
class Machine:
    name: str
    ip: str
    ns: str
    link: str
    state: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PARVISOR_STATE_DIR": str(self.state)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``parvisor ARGS`` inside this machine (its namespace, its state dir)."""
        done = subprocess.run(["ip", "netns", "exec", self.ns, PARVISOR, *args],
                              env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name}: parvisor {' '.join(args)} exited "
                                 f"{done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def json(self, *args: str) -> dict | list:
        return json.loads(self.run(*args, "--json").stdout)

    def spawn(self, role: str, argv: list[str]) -> None:
        log = open(self.state / f"{role}.log", "ab")
        self.procs[role] = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv],
                                            env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start_service(self) -> None:
        self.spawn("service", [PARVISOR, "host", "serve"])
        wait_for(self._answers, 30, f"{self.name}'s host service to answer", interval=0.1)

    def _answers(self) -> bool:
        proc = self.procs["service"]
        if proc.poll() is not None:
            raise AssertionError(f"{self.name}'s service exited {proc.returncode}:\n"
                                 + (self.state / "service.log").read_text()[-3000:])
        transport = httpx.HTTPTransport(uds=str(self.state / "run" / "api.sock"))
        try:
            with httpx.Client(transport=transport, base_url="http://p", timeout=5) as api:
                return api.get("/v1/host").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, role: str) -> None:
        """SIGTERM (a clean stop: the service gives its lease back), by PID."""
        proc = self.procs.pop(role)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    def config_text(self) -> str:
        return (self.state / "config.toml").read_text()


@pytest.fixture
def machines(tiny_image):
    prefix, subnet = f"pca{secrets.token_hex(2)}", f"10.233.{random.randint(1, 250)}"
    bridge = f"{prefix}-br"
    made = {name: Machine(name, f"{subnet}.{i}", f"{prefix}-{name}", f"{prefix}-{name}",
                          short_state_dir(f"pvc{name}-"))
            for i, name in enumerate(("a", "b", "w"), start=1)}
    try:
        net.make_bridge(bridge, f"{subnet}.254/24")
        for m in made.values():
            net.make_node(m.ns, m.link, bridge, f"{m.ip}/24")
            # distinct host names (one machine's hostname for all); no qemu user needed
            (m.state / "config.toml").write_text(f'host_name = "{m.name}"\nqemu_user = ""\n')
            (m.state / "images").mkdir()
            (m.state / "images" / "tiny").symlink_to(test_image_dir() / "images" / "tiny")
        yield made
    finally:
        for m in made.values():
            if "service" in m.procs:
                try:
                    m.stop("service")
                except subprocess.TimeoutExpired:
                    pass
        pids = [p.pid for m in made.values() for p in m.procs.values()]
        pids += [pid for m in made.values() for pid in net.netns_pids(m.ns)]
        survivors = net.kill_pids(sorted(set(pids)))
        left = net.remove([m.ns for m in made.values()], [m.link for m in made.values()],
                          bridge)
        keep = Path("/tmp/pvc-last-logs")      # for a failed run's post-mortem
        shutil.rmtree(keep, ignore_errors=True)
        for m in made.values():
            for log in m.state.glob("*.log"):
                (keep / m.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(log, keep / m.name / log.name)
            shutil.rmtree(m.state, ignore_errors=True)
        assert not survivors and not left, f"left behind: {survivors} {left}"


def test_create_join_status_leave(machines):
    a, b, w = machines["a"], machines["b"], machines["w"]
    endpoints = ",".join(f"https://{m.ip}:2379" for m in (a, b, w))

    # b is a standalone host with a VM (SQLite)
    b.start_service()
    b.run("vm", "create", "web", "--image", "tiny", "--memory", "128M")
    web = b.json("vm", "show", "web")

    # a: the cluster's CA and member certificates, and how to start each member
    created = a.json("cluster", "create", "prod", "--etcd", endpoints)
    pki = a.state / "cluster" / "pki"
    assert {"ca.crt", "ca.key", f"etcd-{a.ip}.crt", f"etcd-{b.ip}.key",
            f"etcd-{w.ip}.crt"} <= {p.name for p in pki.iterdir()}
    members = {m["address"]: m for m in created["etcd_members"]}
    assert set(members) == {a.ip, b.ip, w.ip}
    assert "[cluster]" not in a.config_text()

    # bad input: create twice -> refused, CA and config unchanged
    ca_before, config_before = (pki / "ca.crt").read_bytes(), a.config_text()
    again = a.run("cluster", "create", "prod", "--etcd", endpoints, check=False)
    assert again.returncode == 1 and "already holds a cluster CA" in again.stderr
    assert (pki / "ca.crt").read_bytes() == ca_before and a.config_text() == config_before

    # copy the pki to the other machines, as the printed steps say
    for m in (b, w):
        shutil.copytree(pki, m.state / "cluster" / "pki")

    # bad input: join while etcd is not up yet -> a clear error, nothing changed
    failed = a.run("cluster", "join", "prod", "--etcd", endpoints, check=False)
    assert failed.returncode == 1 and "etcd is not reachable" in failed.stderr
    assert "nothing was changed" in failed.stderr and a.config_text() == config_before
    # bad input: join while the service runs -> refused, SQLite and config untouched
    running = b.run("cluster", "join", "prod", "--etcd", endpoints, check=False)
    assert running.returncode == 1 and "service is running" in running.stderr
    assert "[cluster]" not in b.config_text() and (b.state / "parvisor.db").exists()

    # each member with the command `create` printed (w's makes it the witness)
    for m in (a, b, w):
        argv = members[m.ip]["command"]
        assert argv[:4] == ["parvisor", "cluster", "witness", "serve"]
        m.spawn("etcd", [PARVISOR, *argv[1:]])

    # join: a (nothing to move), then b (its VM moves into etcd)
    b.stop("service")
    joined_a = wait_for(lambda: _join(a, endpoints), 30, "etcd to answer a's join",
                        interval=0.5)
    assert joined_a["moved_vms"] == []
    shared = b.state / "shared"        # stands for the cluster storage mount
    shared.mkdir()
    joined_b = b.json("cluster", "join", "prod", "--etcd", endpoints,
                      "--shared-storage", str(shared), "--site", "east")
    assert joined_b["moved_vms"] == ["web"] and joined_b["host"] == "b"
    assert not (b.state / "parvisor.db").exists()     # retired: never found again
    assert Path(joined_b["sqlite_kept_as"]).exists()
    for m in (a, b):
        assert '[cluster]\nname = "prod"' in m.config_text()

    a.start_service()
    b.start_service()
    seen = {v["name"]: v for v in a.json("vm", "list")}
    assert seen["web"]["uuid"] == web["uuid"]

    status = wait_for(lambda: _both_members(a), 30, "a and b to hold leases")
    assert status["quorum"] is True and status["cluster"] == "prod"
    hosts = {h["name"]: h for h in status["hosts"]}
    assert (hosts["b"]["shared_storage"], hosts["b"]["site"]) == (True, "east")
    assert (hosts["a"]["shared_storage"], hosts["a"]["site"]) == (False, "")
    for name in ("a", "b"):
        assert hosts[name]["health"] == "up"
        assert 0 <= hosts[name]["lease_age_s"] <= hosts[name]["lease_ttl_s"] == TTL_S
    etcd = {e["name"]: e for e in status["etcd"]}
    assert set(etcd) == {"m1", "m2", "m3"}
    assert all(e["voter"] and e["reachable"] for e in etcd.values())
    assert sum(e["leader"] for e in etcd.values()) == 1
    # the member on no host is named as the witness (members m1..m3 in a, b, w order)
    assert {name for name, e in etcd.items() if e["witness"]} == {"m3"}

    # TLS is really on: a client without a certificate is refused
    no_cert = EtcdKV([f"https://{w.ip}:2379"], timeout_s=2.0,
                     tls=TlsFiles(str(pki / "ca.crt"), "", ""))
    no_cert._clients[0].session.cert = None
    with pytest.raises(ClusterUnavailable):
        no_cert.get_prefix("/parvisor/")

    # leave: refused while the service runs; then b's VMs stay in the cluster
    refused = b.run("cluster", "leave", check=False)
    assert refused.returncode == 1 and "service is running" in refused.stderr
    b.stop("service")                 # clean stop: lease revoked
    left = b.json("cluster", "leave")
    assert left["left"] == "prod" and left["host"] == "b"
    assert "[cluster]" not in b.config_text()
    after = a.json("cluster", "status")
    assert [h["name"] for h in after["hosts"]] == ["a"]
    assert [v["name"] for v in after["vms"]] == ["web"]
    b.start_service()
    assert b.json("vm", "list") == []          # standalone and empty


def _join(m: Machine, endpoints: str, *extra: str) -> dict | None:
    done = m.run("cluster", "join", "prod", "--etcd", endpoints, *extra, "--json",
                 check=False)
    if done.returncode == 0:
        return json.loads(done.stdout)
    assert "etcd is not reachable" in done.stderr, done.stderr      # only "not yet"
    assert "[cluster]" not in m.config_text()
    return None


def _both_members(m: Machine) -> dict | None:
    status = m.json("cluster", "status")
    members = {h["name"] for h in status.get("hosts", []) if h["member"]}
    return status if {"a", "b"} <= members else None


def test_bad_input_changes_nothing():
    state = short_state_dir("pvcx-")
    try:
        (state / "config.toml").write_text('host_name = "x"\n')
        env = {**os.environ, "PARVISOR_STATE_DIR": str(state)}

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([PARVISOR, *args], env=env, capture_output=True,
                                  text=True, timeout=60)
        for bad in ("http://10.0.0.1:2379", "https://10.0.0.1:2379,https://10.0.0.1:2379"):
            done = cli("cluster", "create", "prod", "--etcd", bad)
            assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr
        assert not (state / "cluster").exists()
        done = cli("cluster", "join", "prod", "--etcd", "https://10.0.0.1:2379")
        assert done.returncode == 1 and "no cluster CA" in done.stderr
        done = cli("cluster", "join", "prod", "--etcd", "https://10.0.0.1:2379",
                   "--shared-storage", str(state / "not-mounted"))
        assert done.returncode == 1 and "not a directory" in done.stderr
        done = cli("cluster", "leave")
        assert done.returncode == 1 and "not a cluster member" in done.stderr
        assert (state / "config.toml").read_text() == 'host_name = "x"\n'
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow     # boots a QEMU (TCG) and restarts services: minutes on a loaded box
def test_leave_releases_this_hosts_vm_to_the_cluster(machines):
    """``cluster leave`` refuses while a QEMU of the host runs; once the VM is off, leave
    releases it and another host starts it (disk on the cluster storage)."""
    a, b, w = machines["a"], machines["b"], machines["w"]
    shared = short_state_dir("pvcs-")
    try:
        for m in (a, b):
            with open(m.state / "config.toml", "a") as config:
                config.write(f'storage_roots = ["{shared}", "{m.state / "local"}"]\n')
        endpoints = ",".join(f"https://{m.ip}:2379" for m in (a, b, w))
        created = a.json("cluster", "create", "prod", "--etcd", endpoints)
        for m in (b, w):
            shutil.copytree(a.state / "cluster" / "pki", m.state / "cluster" / "pki")
        for member in created["etcd_members"]:
            owner = next(m for m in (a, b, w) if m.ip == member["address"])
            owner.spawn("etcd", [PARVISOR, *member["command"][1:]])
        for m in (a, b):
            wait_for(lambda: _join(m, endpoints, "--shared-storage", str(shared)), 30,
                     f"{m.name}'s join", interval=0.5)
            m.start_service()
        b.run("vm", "create", "web", "--image", "tiny", "--memory", "128M",
              "--preferred-hosts", "b")
        uuid = b.json("vm", "show", "web")["uuid"]
        b.run("vm", "start", "web")
        wait_for(lambda: _qemu_here(b, uuid), 90, "web's QEMU on b", interval=0.5)

        b.stop("service")                     # a non-HA VM keeps running
        refused = b.run("cluster", "leave", check=False)
        assert refused.returncode == 1 and "VMs still run on this host: web" in refused.stderr
        assert "[cluster]" in b.config_text()

        b.start_service()                     # what the user does: turn it off first
        b.run("vm", "turn-off", "web")
        wait_for(lambda: not _qemu_here(b, uuid), 30, "web's QEMU on b to end")
        b.stop("service")
        left = b.json("cluster", "leave")
        assert left["host"] == "b"
        a.run("vm", "start", "web")
        wait_for(lambda: _qemu_here(a, uuid), 90, "web's QEMU on a", interval=0.5)
        assert not _qemu_here(b, uuid)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _qemu_here(m: Machine, vm_uuid: str) -> bool:
    try:
        pid = int((m.state / "vms" / vm_uuid / "qemu.pid").read_text())
        return vm_uuid.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
