"""The cluster inside the host service: store choice, watchdog process, agent thread.

What for: ``HostService`` asks ``cluster_runtime(config)`` once. Standalone hosts get
``None`` (SQLite, as before). A host whose config.toml has a ``[cluster]`` section gets
a ``ClusterRuntime``: the etcd store (every definition in etcd), the cluster-aware VM
manager class, adoption of this host's surviving QEMUs (and nothing else: other VMs run
elsewhere), and ``start``, which starts (or re-uses) the fencing watchdog and runs the
agent loop (keepalive, self-fence, manager election, ``decide``) in a thread.

Shutdown (service stopped on purpose): the HA VMs here are killed first and the lease
revoked, so the cluster restarts them elsewhere at once; without the kill the lease
would expire while they still ran (INV-1). Non-HA VMs keep running, as on a standalone
host. A service that *crashes* leaves the watchdog armed: it kills the HA VMs by the
deadline unless a restarted service keeps the lease alive first.

Never: start a second watchdog while the recorded one lives (it would not be fed);
stop processes other than by their recorded PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from parvisor.cluster.agent import Agent
from parvisor.cluster.env import ClusterUnavailable, HostRecord
from parvisor.cluster.etcd_env import EtcdEnv
from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles
from parvisor.cluster.local_host import ServiceLocalHost, pid_alive
from parvisor.cluster.model import ClusterPolicy
from parvisor.cluster.settings import ClusterSettings
from parvisor.cluster.vm_ops import ClusterVmManager
from parvisor.cluster.watchdog import WatchdogClient, process_start_ticks
from parvisor.config import HostConfig
from parvisor.errors import ServiceUnavailable
from parvisor.migration.coordinator import MigrationCoordinator
from parvisor.replication.coordinator import ReplicationCoordinator
from parvisor.replication.paths import free_bytes, replica_root
from parvisor.store.etcd import EtcdStore
from parvisor.vm.paths import VmPaths, vms_dir
from parvisor.vm.process import QemuProcess

log = logging.getLogger("parvisor.cluster")
ETCD_WAIT_LOG_EVERY_S = 10.0


def cluster_runtime(config: HostConfig) -> "ClusterRuntime | None":
    if config.cluster is None:
        return None
    return ClusterRuntime(config, ClusterSettings.from_table(config.cluster, config.host_name))


def tls_of(settings: ClusterSettings) -> TlsFiles:
    return TlsFiles(str(settings.ca), str(settings.cert), str(settings.key))


def policy_of(settings: ClusterSettings) -> ClusterPolicy:
    return ClusterPolicy(lease_ttl_s=settings.lease_ttl_s,
                         keepalive_interval_s=settings.keepalive_interval_s,
                         fence_margin_s=settings.fence_margin_s,
                         recovery_grace_s=settings.recovery_grace_s, live_drain=True)


class ClusterRuntime:
    vm_manager_class = ClusterVmManager
    api_url = ""        # this host's cluster API, set by the service before start()

    def __init__(self, config: HostConfig, settings: ClusterSettings) -> None:
        self.config = config
        self.settings = settings
        self.dir = config.state_dir / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        tls = tls_of(settings)
        self.store = EtcdStore(EtcdKV(list(settings.endpoints), timeout_s=2.0, tls=tls),
                               settings.name)
        # The agent's own client: short timeouts, so an unreachable endpoint cannot hold
        # the keepalive loop for long (the fence deadline is checked between calls).
        self.agent_kv = EtcdKV(list(settings.endpoints), timeout_s=1.0, tls=tls)
        self.agent: Agent | None = None
        self.migrations: MigrationCoordinator | None = None
        self.replication: ReplicationCoordinator | None = None
        self._stop = threading.Event()
        self._watchdog_pid: int | None = None
        self._watchdog: WatchdogClient | None = None

    def configure(self, vms: ClusterVmManager) -> None:
        vms.shared_storage = self.settings.shared_storage

    # --- service start: this host's QEMUs only --------------------------------------
    async def adopt(self, vms: ClusterVmManager) -> None:
        """Wait for etcd, then re-adopt the QEMUs that outlived the previous service.
        A VM without a QEMU here is not "crashed": it may run on another host."""
        self.configure(vms)
        records = await self._wait_for_etcd(lambda: vms.store.list_vms())
        known = {record.uuid for record in records}
        for record in records:
            process = await QemuProcess.adopt(
                vms.paths(record.uuid), record.uuid,
                on_event=lambda name, data, r=record: vms._on_qmp_event(r, name, data))
            if process is not None:
                vms._attach(record, vms.runtime(record.uuid), process)
                await vms.hotplug.after_adopt(record, vms.runtime(record.uuid))
                log.info("cluster: re-adopted %s (pid %d)", record.name, process.pid)
        await self._stop_unknown_qemus(vms, known)

    async def _wait_for_etcd(self, read):
        last_log = float("-inf")
        while True:
            try:
                return await asyncio.to_thread(read)
            except ClusterUnavailable as exc:
                if time.monotonic() - last_log >= ETCD_WAIT_LOG_EVERY_S:
                    log.warning("cluster: waiting for etcd: %s", exc.message)
                    last_log = time.monotonic()
                await asyncio.sleep(1.0)

    async def _stop_unknown_qemus(self, vms: ClusterVmManager, known: set[str]) -> None:
        """QEMUs of VMs deleted meanwhile (INV-5). Disk dirs on shared storage are left
        alone: another host may be creating a VM there right now."""
        root = vms_dir(self.config.state_dir)
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            if entry.name in known or not entry.is_dir():
                continue
            process = await QemuProcess.adopt(VmPaths(self.config.state_dir, entry.name),
                                              entry.name)
            if process is not None:
                log.warning("cluster: stopping QEMU pid %d of deleted VM", process.pid)
                await process.stop()
            shutil.rmtree(entry, ignore_errors=True)

    # --- the agent ------------------------------------------------------------------
    async def start(self, vms: ClusterVmManager) -> list[asyncio.Task]:
        self._watchdog = self._connect_watchdog()
        self.migrations = MigrationCoordinator(
            vms, self.settings.host, migration_address=self.settings.migration_ip(),
            max_concurrent=self.settings.max_concurrent_migrations,
            tls_wanted=self.settings.migration_tls, tls_dir=self._migration_tls_dir())
        vms.migrations = self.migrations
        self.replication = ReplicationCoordinator(
            vms, self.settings.host, address=self.settings.migration_ip(),
            root=self.replica_root, tls_dir=self.migrations.tls_dir)
        vms.replication = self.replication
        local = ServiceLocalHost(vms, asyncio.get_running_loop(), self.dir / "lease",
                                 self._watchdog, self.settings.host,
                                 incoming=self.migrations.incoming)
        env = EtcdEnv(self.agent_kv, self.settings.name, self.settings.host, local,
                      self.settings.shared_storage)
        self.agent = Agent(env, self._host_record(), policy_of(self.settings))
        thread = threading.Thread(target=self._loop, name="cluster-agent", daemon=True)
        thread.start()
        return [asyncio.create_task(self._supervise(thread)),
                asyncio.create_task(self.migrations.run(), name="migrations"),
                asyncio.create_task(self.replication.run(), name="replication")]

    @property
    def replica_root(self) -> Path:
        return replica_root(self.config.storage_roots, self.config.state_dir,
                            self.settings.shared_storage)

    def _host_record(self) -> HostRecord:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return HostRecord(self.settings.host, memory, os.cpu_count() or 1,
                          shared_storage=self.settings.shared_storage is not None,
                          site=self.settings.site, migration=self._migration_facts(),
                          api_url=self.api_url,
                          replica_free_bytes=free_bytes(self.replica_root))

    def _migration_tls_dir(self) -> Path | None:
        """QEMU's TLS files for migration streams, issued once from the cluster CA
        (its key must be in the pki dir the first time; later starts reuse them)."""
        if not self.settings.migration_tls:
            return None
        from parvisor.cluster.certs import CertPair
        from parvisor.migration.tls import QEMU_TLS_FILES, write_tls_dir
        directory = self.dir / "migration-tls"
        if all((directory / name).exists() for name in QEMU_TLS_FILES):
            return directory
        ca_key = self.settings.ca.with_name("ca.key")
        if not ca_key.exists():
            log.error("cluster: migration_tls is on but %s is missing: migrations from "
                      "and to this host are refused until it is there", ca_key)
            return None
        return write_tls_dir(directory, CertPair(self.settings.ca, ca_key),
                             hosts=(self.settings.migration_ip(),),
                             name=f"migration-{self.settings.host}",
                             owner=self.config.qemu_user or None)

    def _migration_facts(self) -> dict[str, Any]:
        from parvisor.migration.checks import local_facts
        try:
            return local_facts(self.config, self.settings, self.store)
        except Exception as exc:   # noqa: BLE001 - a host without facts is refused, not down
            log.error("cluster: migration facts not published: %s", exc)
            return {}

    def _loop(self) -> None:
        assert self.agent is not None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.agent.tick()
            except Exception:      # noqa: BLE001 - the loop must outlive one bad tick
                log.exception("cluster: agent tick failed")
            self._stop.wait(max(0.0, self.settings.tick_s - (time.monotonic() - started)))

    async def _supervise(self, thread: threading.Thread) -> None:
        try:
            while thread.is_alive():
                await asyncio.sleep(1.0)
        finally:
            self._stop.set()
            await asyncio.to_thread(thread.join, 10)
            self.shutdown()

    def shutdown(self) -> None:
        """Clean stop: kill the HA VMs here, give the lease back, stop the watchdog."""
        agent = self.agent
        if agent is not None:
            agent._fence("service stopping")      # kills HA VMs by PID, logs them
            if agent.lease_id is not None:
                with contextlib.suppress(ClusterUnavailable):
                    agent.env.lease_revoke(agent.lease_id)
                agent.env.save_lease(None)
        self._stop_watchdog()
        if self.replication is not None:
            self.replication.detach()

    # --- the watchdog process -------------------------------------------------------
    @property
    def _watchdog_socket(self) -> Path:
        return self.config.state_dir / "run" / "watchdog.sock"

    @property
    def _watchdog_pidfile(self) -> Path:
        return self.dir / "watchdog.pid"

    def _connect_watchdog(self) -> WatchdogClient:
        recorded = self._recorded_watchdog()
        if recorded is None:
            recorded = self._spawn_watchdog()
        self._watchdog_pid = recorded
        return WatchdogClient(self._watchdog_socket)

    def _recorded_watchdog(self) -> int | None:
        """The watchdog a crashed service left armed, if it still lives (same start)."""
        try:
            pid, start = map(int, self._watchdog_pidfile.read_text().split())
        except (OSError, ValueError):
            return None
        if process_start_ticks(pid) != start or not self._watchdog_socket.exists():
            return None
        return pid

    def _spawn_watchdog(self) -> int:
        self._watchdog_socket.parent.mkdir(parents=True, exist_ok=True)
        logfile = open(self.dir / "watchdog.log", "ab")
        # its own session: a SIGKILL of the service's process group leaves it armed
        proc = subprocess.Popen([sys.executable, "-m", "parvisor.cluster.watchdog",
                                 "--socket", str(self._watchdog_socket)],
                                stdout=logfile, stderr=logfile, start_new_session=True)
        logfile.close()
        self._watchdog_pidfile.write_text(f"{proc.pid} {process_start_ticks(proc.pid)}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceUnavailable("the fencing watchdog exited at start; see "
                                         f"{self.dir / 'watchdog.log'}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self._watchdog_socket))
                return proc.pid
            time.sleep(0.05)
        raise ServiceUnavailable("the fencing watchdog did not open its socket in 10 s")

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                self._watchdog.disarm()      # the HA VMs are dead already
                self._watchdog.close()
        pid = self._watchdog_pid
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
        self._watchdog_pidfile.unlink(missing_ok=True)

    # --- API: status and maintenance ------------------------------------------------
    def status(self) -> dict[str, Any]:
        from parvisor.cluster.status import cluster_status
        data = cluster_status(self.store.kv, self.settings.name, self.settings.shared_storage)
        agent = self.agent
        data["this_host"] = {"name": self.settings.host,
                             "lease_id": agent.lease_id if agent else None,
                             "fenced": agent.fenced if agent else None,
                             "timings": policy_of(self.settings).__dict__}
        return data

    def set_cpu_baseline(self, model: str) -> dict[str, Any]:
        """``cluster cpu-baseline MODEL|auto|none``: the named CPU model every VM of the
        cluster starts with (from its next start), so VMs move between different CPUs.
        Refused unless every host published that it can run the model."""
        from parvisor.cluster.etcd_kv import op_delete, op_put
        from parvisor.errors import InvalidInput
        from parvisor.migration.compat import choose_cpu_baseline
        from parvisor.vm.firmware import cpu_model_name
        keys = self.store.keys
        if model == "none":
            self.store.kv.txn([], [op_delete(keys.cpu_baseline)])
            return {"cpu_baseline": None, "note": "VMs start with the host CPU (host/max) "
                    "from their next start; they then move only between identical hosts"}
        models = self._hosts_cpu_models()
        if model == "auto":
            chosen = choose_cpu_baseline(models)
            if chosen is None:
                raise InvalidInput("no named CPU model runs on every host", hosts=sorted(models))
            model = chosen
        try:
            cpu_model_name("kvm", model)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        lacking = sorted(host for host, names in models.items() if model not in names)
        if lacking:
            raise InvalidInput(f"CPU model {model!r} cannot run on {', '.join(lacking)}",
                               lacking=lacking)
        self.store.kv.txn([], [op_put(keys.cpu_baseline, model)])
        return {"cpu_baseline": model, "hosts": sorted(models),
                "note": "applies to each VM from its next start"}

    def _hosts_cpu_models(self) -> dict[str, tuple[str, ...]]:
        import json
        items, _ = self.store.kv.get_prefix(self.store.keys.under("hosts"))
        return {item.key.rsplit("/", 1)[-1]:
                tuple(json.loads(item.value).get("migration", {}).get("cpu_models", ()))
                for item in items}

    def set_maintenance(self, host: str, on: bool) -> dict[str, Any]:
        """``host drain``: no new placements; running VMs live-migrate to other hosts
        (stopped and started elsewhere when that fails or they are not running).
        ``host resume`` ends it (VMs do not move back by themselves)."""
        from parvisor.cluster.etcd_kv import op_delete, op_put
        from parvisor.errors import NotFound
        keys = self.store.keys
        if self.store.kv.get(keys.host(host)) is None:
            raise NotFound(f"no cluster host named {host!r}", host=host)
        op = op_put(keys.maintenance(host), "drain") if on else op_delete(keys.maintenance(host))
        self.store.kv.txn([], [op])
        return {"host": host, "maintenance": on,
                "note": ("running VMs live-migrate to other hosts (a VM whose live "
                         "migration fails is shut down and started elsewhere)" if on
                         else "new placements allowed again")}
