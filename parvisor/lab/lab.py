"""``parvisor lab``: an N-host failover cluster on one Linux machine.

What for: evaluating parvisor on a laptop and the real-lab tests. ``up`` builds, per
host ``hN`` (and a witness ``w``): a network namespace joined by veth to a bridge, an
etcd member (odd voter count: with an even count the last host runs no member), a host
service (the agent) in that namespace with its own state dir, a local storage dir, and
a shared storage dir for all. Each host also has its own mount namespace
(``parvisor.lab.mounts``) in which every *other* host's local storage dir is an empty
read-only tmpfs: local storage is seen by its host only. Every PID, namespace, link and
directory is recorded in ``<lab dir>/lab.json``; ``down`` removes exactly those
(processes by PID, including any other process found inside a lab namespace; mounts
below the lab dir).

Faults: ``fail`` = power loss (every process in the namespace SIGKILLed, link down, its
local storage covered in the root namespace too: unreachable to anyone, and ``lab exec``
refused), ``recover`` = power back (link up, storage back, etcd member and service start
again; no VM of its own runs), ``isolate``/``heal`` = network cut/restored (processes
keep running).

Capacity on a 2-core machine: keep to <= 2 idle tiny guests per host and <= 3 hosts;
lease TTL 8 s, interval 1 s, margin 2.5 s tolerate ~4 s of scheduling stalls, so load
alone never causes a failover (measured: docs/cluster.md).

Never: kill by name; leave a namespace, link or bridge behind on ``down``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parvisor.cluster import certs
from parvisor.cluster.admin import etcd_argv
from parvisor.cluster.settings import CLUSTER_API_PORT, ClusterSettings
from parvisor.errors import Failed, InvalidInput, NotFound
from parvisor.lab import mounts, net

DEFAULT_LAB_DIR = Path("/tmp/parvisor-lab")
CLUSTER = "lab"
VENV_BIN = Path(sys.executable).parent


def lab_dir_from_env(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("PARVISOR_LAB_DIR") or DEFAULT_LAB_DIR).absolute()


@dataclass
class Node:
    name: str
    ip: str
    ns: str
    link: str                 # root-side veth end (on the bridge)
    etcd: bool
    runs_vms: bool = True     # False: the witness
    site: str = ""
    pids: dict[str, int] = field(default_factory=dict)    # role -> PID (etcd, service)
    mount_ns: str = ""        # file holding its mount namespace ("" before it exists)
    powered: bool = True      # False between lab fail and lab recover


@dataclass
class LabState:
    prefix: str
    subnet: str               # "10.231.N"
    bridge: str
    shared: bool
    token: str
    nodes: dict[str, Node]

    def save(self, directory: Path) -> None:
        tmp = directory / "lab.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, directory / "lab.json")

    @classmethod
    def load(cls, directory: Path) -> "LabState":
        try:
            doc = json.loads((directory / "lab.json").read_text())
        except OSError as exc:
            raise NotFound(f"no lab in {directory} (run 'parvisor lab up')") from exc
        doc["nodes"] = {name: Node(**node) for name, node in doc["nodes"].items()}
        return cls(**doc)


class Lab:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    # --- layout ---------------------------------------------------------------------
    def node_dir(self, name: str) -> Path:
        return self.dir / name

    def state_dir(self, name: str) -> Path:
        return self.dir / name / "state"

    def local_dir(self, name: str) -> Path:
        """A host's local storage: visible in its own mount namespace only."""
        return self.dir / name / "local"

    @property
    def mount_dir(self) -> Path:
        return self.dir / mounts.NS_DIR_NAME

    @property
    def shared_dir(self) -> Path:
        return self.dir / "shared"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    def state(self) -> LabState:
        return LabState.load(self.dir)

    def node(self, name: str) -> Node:
        state = self.state()
        if name not in state.nodes:
            raise NotFound(f"no lab host {name!r} (hosts: {', '.join(state.nodes)})")
        return state.nodes[name]

    # --- up -------------------------------------------------------------------------
    def up(self, hosts: int, witness: bool, sites: dict[str, str], shared: bool,
           image: Path | None) -> LabState:
        if (self.dir / "lab.json").exists():
            raise InvalidInput(f"a lab already exists in {self.dir}: 'parvisor lab down' first")
        if not 1 <= hosts <= 5:
            raise InvalidInput("a lab has 1 to 5 hosts (2 cores: keep it to 3)")
        self.dir.mkdir(parents=True, exist_ok=True)
        state = plan(hosts, witness, sites, shared)
        state.save(self.dir)            # recorded before anything exists: down cleans up
        net.make_bridge(state.bridge, f"{state.subnet}.254/24")
        for node in state.nodes.values():
            net.make_node(node.ns, node.link, state.bridge, f"{node.ip}/24")
        self._make_mount_namespaces(state)     # after the netns: it copies /run/netns/*
        state.save(self.dir)
        self._make_pki(state)
        for node in state.nodes.values():
            if node.etcd:
                self._start_etcd(state, node, "new")
        for node in state.nodes.values():
            if node.runs_vms:
                self._prepare_host(state, node, image)
                self._start_service(state, node)
        state.save(self.dir)
        self.wait_members(state, [n.name for n in state.nodes.values() if n.runs_vms])
        return state

    def _make_mount_namespaces(self, state: LabState) -> None:
        local_dirs = {n.name: self.local_dir(n.name) for n in state.nodes.values()
                      if n.runs_vms}
        for path in local_dirs.values():
            path.mkdir(parents=True, exist_ok=True)     # mount points of the covers
        mounts.make_ns_dir(self.mount_dir)
        for node in state.nodes.values():
            node.mount_ns = str(self.mount_dir / node.name)
            mounts.make_host_ns(Path(node.mount_ns), mounts.hidden_from(node.name, local_dirs),
                                f"{state.prefix}-hidden")

    def _make_pki(self, state: LabState) -> None:
        ca = certs.make_ca(self.pki, CLUSTER)
        for node in state.nodes.values():
            if node.etcd:
                certs.issue(ca, self.pki, f"etcd-{node.name}", server=True,
                            hosts=(node.ip, "127.0.0.1"))
            if node.runs_vms:
                certs.issue(ca, self.pki, f"host-{node.name}", server=False)
        certs.issue(ca, self.pki, "admin", server=False)     # lab status from outside

    def endpoints(self, state: LabState, first: str | None = None) -> list[str]:
        """Client URLs; a host lists its own member first (local reads are fastest)."""
        nodes = sorted((n for n in state.nodes.values() if n.etcd),
                       key=lambda n: (n.name != first, n.name))
        return [f"https://{n.ip}:2379" for n in nodes]

    def _start_etcd(self, state: LabState, node: Node, cluster_state: str) -> None:
        initial = ",".join(f"{n.name}=https://{n.ip}:2380" for n in state.nodes.values()
                           if n.etcd)
        server = certs.CertPair(self.pki / f"etcd-{node.name}.crt",
                                self.pki / f"etcd-{node.name}.key")
        argv = etcd_argv(node.name, node.ip, self.node_dir(node.name) / "etcd", initial,
                         cluster_state, server, self.pki / "ca.crt", state.token)
        node.pids["etcd"] = self._spawn(node, argv, "etcd.log")

    def _spawn(self, node: Node, argv: list[str], log_name: str,
               env: dict[str, str] | None = None) -> int:
        self.node_dir(node.name).mkdir(parents=True, exist_ok=True)
        with open(self.node_dir(node.name) / log_name, "ab") as log:
            proc = subprocess.Popen(host_argv(node, argv), stdout=log,
                                    stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        return proc.pid     # nsenter and ip netns exec exec the command: same PID

    def host_env(self, node: Node) -> dict[str, str]:
        return {**os.environ, "PARVISOR_STATE_DIR": str(self.state_dir(node.name)),
                "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def _prepare_host(self, state: LabState, node: Node, image: Path | None) -> None:
        sdir, local = self.state_dir(node.name), self.local_dir(node.name)
        for directory in (sdir / "images", local):
            directory.mkdir(parents=True, exist_ok=True)
        if image is not None and image.is_dir():
            (sdir / "images" / "tiny").symlink_to(image)
        roots = [str(self.shared_dir), str(local)] if state.shared else [str(local)]
        if state.shared:
            self.shared_dir.mkdir(exist_ok=True)
        settings = ClusterSettings(
            name=CLUSTER, host=node.name, endpoints=tuple(self.endpoints(state, node.name)),
            ca=self.pki / "ca.crt", cert=self.pki / f"host-{node.name}.crt",
            key=self.pki / f"host-{node.name}.key", site=node.site, migration_address=node.ip,
            api_port=CLUSTER_API_PORT,      # requests about VMs forwarded between hosts
            migration_tls=True,     # the lab runs as a secure cluster should
            shared_storage=self.shared_dir if state.shared else None)
        (sdir / "config.toml").write_text(
            f"host_name = {json.dumps(node.name)}\nstorage_roots = {json.dumps(roots)}\n"
            "qemu_user = \"\"\nshutdown_timeout_s = 20.0\n" + settings.render())

    def _start_service(self, state: LabState, node: Node,
                       env: dict[str, str] | None = None) -> None:
        argv = [str(VENV_BIN / "parvisor"), "host", "serve"]
        node.pids["service"] = self._spawn(node, argv, "service.log",
                                           {**self.host_env(node), **(env or {})})

    # --- faults ---------------------------------------------------------------------
    def fail(self, name: str) -> list[int]:
        """Power loss: every process of the host dies at once, its link goes down, its
        local storage becomes unreachable (other hosts never could read it; the root
        namespace gets a cover over it until ``recover``)."""
        state = self.state()
        node = state.nodes[self.node(name).name]
        net.set_link(node.link, False)
        killed = net.netns_pids(node.ns)
        survivors = net.kill_pids(killed)
        if survivors:
            raise Failed(f"lab host {name}: processes {survivors} survived SIGKILL")
        node.pids = {}
        if node.runs_vms and node.powered:
            mounts.cover(self.local_dir(name), f"{state.prefix}-off")
        node.powered = False
        state.save(self.dir)
        return killed

    def recover(self, name: str) -> None:
        """Power back: link up, etcd member and host service start again."""
        state = self.state()
        node = state.nodes[self.node(name).name]
        if net.netns_pids(node.ns):
            raise InvalidInput(f"lab host {name} is running (lab fail it first)")
        net.set_link(node.link, True)
        if not node.powered and mounts.is_mount_point(self.local_dir(name)):
            mounts.uncover(self.local_dir(name))
        node.powered = True
        if node.etcd:
            self._start_etcd(state, node, "existing")
        if node.runs_vms:
            self._start_service(state, node)
        state.save(self.dir)

    def crash_service(self, name: str) -> int:
        """SIGKILL of the host service alone (its QEMUs, etcd and watchdog live on)."""
        state = self.state()
        node = state.nodes[self.node(name).name]
        pid = node.pids.get("service")
        if pid is None or not net.pid_alive(pid):
            raise InvalidInput(f"lab host {name} has no running service")
        if net.kill_pids([pid]):
            raise Failed(f"lab host {name}: service {pid} survived SIGKILL")
        del node.pids["service"]
        state.save(self.dir)
        return pid

    def start_service(self, name: str, env: dict[str, str] | None = None) -> int:
        """Start the host service again after ``crash_service`` (``env``: extra
        variables, e.g. ``PARVISOR_CRASH_AT`` for crash-point tests); its PID."""
        state = self.state()
        node = state.nodes[self.node(name).name]
        if node.pids.get("service") and net.pid_alive(node.pids["service"]):
            raise InvalidInput(f"lab host {name}: the service runs already")
        self._start_service(state, node, env)
        state.save(self.dir)
        return node.pids["service"]

    def isolate(self, name: str) -> None:
        net.set_link(self.node(name).link, False)

    def heal(self, name: str) -> None:
        net.set_link(self.node(name).link, True)

    # --- using it -------------------------------------------------------------------
    def exec_argv(self, name: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        node = self.node(name)
        if not node.powered:
            raise InvalidInput(f"lab host {name} has lost power: 'parvisor lab recover "
                               f"{name}' first")
        if not node.runs_vms:
            return host_argv(node, argv), dict(os.environ)
        return host_argv(node, argv), self.host_env(node)

    def qemu_pids(self, name: str) -> list[int]:
        """Live QEMUs of this host (from its state dir's pidfiles)."""
        pids = []
        for pidfile in (self.state_dir(name) / "vms").glob("*/qemu.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if net.pid_alive(pid) and f"{pidfile.parent.name}" in _cmdline(pid):
                pids.append(pid)
        return pids

    def admin_kv(self):
        from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles
        tls = TlsFiles(str(self.pki / "ca.crt"), str(self.pki / "admin.crt"),
                       str(self.pki / "admin.key"))
        return EtcdKV(self.endpoints(self.state()), timeout_s=1.5, tls=tls)

    def status(self) -> dict:
        from parvisor.cluster.status import cluster_status
        state = self.state()
        nodes = {}
        for node in state.nodes.values():
            nodes[node.name] = {
                "ip": node.ip, "namespace": node.ns, "link_up": net.link_up(node.link),
                "powered": node.powered, "mount_namespace": node.mount_ns,
                "local_storage": str(self.local_dir(node.name)) if node.runs_vms else None,
                "site": node.site, "etcd_member": node.etcd, "witness": not node.runs_vms,
                "processes": {role: pid for role, pid in node.pids.items()
                              if net.pid_alive(pid)},
                "qemu_pids": self.qemu_pids(node.name) if node.runs_vms else []}
        return {"dir": str(self.dir), "prefix": state.prefix, "nodes": nodes,
                "cluster": cluster_status(self.admin_kv(), CLUSTER,
                                          self.shared_dir if state.shared else None)}

    def wait_members(self, state: LabState, names: list[str], timeout_s: float = 60) -> None:
        """Until every named host holds a lease (its membership key exists)."""
        from parvisor.cluster.env import ClusterUnavailable
        kv, prefix = self.admin_kv(), f"/parvisor/{CLUSTER}/members/"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                items, _ = kv.get_prefix(prefix)
                if set(names) <= {item.key[len(prefix):] for item in items}:
                    return
            except ClusterUnavailable:
                pass
            time.sleep(0.2)
        raise Failed(f"lab hosts {names} did not all join within {timeout_s:.0f} s; see "
                     f"{self.dir}/*/service.log")

    # --- down -----------------------------------------------------------------------
    def down(self) -> list[str]:
        """Remove everything ``up`` made; return what could not be removed."""
        state = self.state()
        recorded = [pid for node in state.nodes.values() for pid in node.pids.values()]
        found = [pid for node in state.nodes.values() for pid in net.netns_pids(node.ns)]
        survivors = net.kill_pids(sorted(set(recorded) | set(found)))
        nodes = list(state.nodes.values())
        left = mounts.unmount_all(self.dir)     # covers, namespace files, their dir
        left += net.remove([n.ns for n in nodes], [n.link for n in nodes], state.bridge)
        left += [f"pid {pid}" for pid in survivors]
        if not left:
            shutil.rmtree(self.dir, ignore_errors=True)
        return left


def host_argv(node: Node, argv: list[str]) -> list[str]:
    """``argv`` inside a lab host: its mount namespace first, then its network
    namespace (``ip netns exec`` copies the current mount namespace, covers included)."""
    return [*mounts.enter_argv(node.mount_ns), "ip", "netns", "exec", node.ns, *argv]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def plan(hosts: int, witness: bool, sites: dict[str, str], shared: bool) -> LabState:
    """Names and addresses; an odd number of etcd voters (witness included)."""
    prefix = f"pl{secrets.token_hex(2)}"
    subnet = f"10.231.{_free_octet()}"
    names = [f"h{i}" for i in range(1, hosts + 1)] + (["w"] if witness else [])
    voters = len(names) if len(names) % 2 else len(names) - 1
    # the witness always votes; with an even count the last host sits out
    voting = (["w"] if witness else []) + [n for n in names if n != "w"][:voters - witness]
    nodes = {}
    for index, name in enumerate(names, start=1):
        nodes[name] = Node(name, f"{subnet}.{index}", f"{prefix}-{name}", f"{prefix}-{name}",
                           etcd=name in voting, runs_vms=name != "w",
                           site=sites.get(name, ""))
    return LabState(prefix, subnet, f"{prefix}-br", shared, f"lab-{prefix}", nodes)


def _free_octet() -> int:
    routes = net.ip("-4", "route", "show", "table", "all", check=False).stdout
    taken = {int(part.split(".")[2]) for part in routes.split()
             if part.startswith("10.231.") and part.count(".") >= 2
             and part.split(".")[2].isdigit()}
    free = [n for n in range(1, 250) if n not in taken]
    if not free:
        raise Failed("no free 10.231.N.0/24 subnet for the lab")
    return random.choice(free)


def parse_sites(specs: list[str]) -> dict[str, str]:
    """``NAME:h1,h2`` ... -> {host: site}."""
    sites = {}
    for spec in specs:
        site, _, members = spec.partition(":")
        if not site or not members:
            raise InvalidInput(f"--site {spec!r}: use NAME:h1,h2")
        for host in members.split(","):
            sites[host] = site
    return sites
