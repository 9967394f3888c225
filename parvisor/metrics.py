"""Prometheus metrics of one host (``GET /metrics``), collected on scrape.

Nothing runs in the background: a scrape first gathers what needs QEMU (block
statistics over QMP) asynchronously under a time budget (``gather``), then a custom
``Collector`` turns that snapshot plus cheap local facts (the store, the job registry,
``/proc`` and ``/sys``) into metric families. A VM whose QEMU does not answer within
the budget simply lacks its disk series for that scrape (and ``parvisor_scrape_partial``
says so) instead of stalling the scraper. On a cluster member the cluster's status
(quorum, manager, hosts and their leases; ``ClusterRuntime.status``, a few etcd calls)
is fetched in a thread under the same budget. Names and labels: ``docs/metrics.md``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from parvisor.model.states import VmState
from parvisor.model.vm import VmStatus
from parvisor.ops.jobs import JobStatus
from parvisor.replication.protocol import State as ReplicationState
from parvisor.vm.argv import tap_name

SCRAPE_BUDGET_S = 2.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYS_NET = Path("/sys/class/net")


@dataclass
class BlockStats:
    device: str
    read_bytes: int
    written_bytes: int
    read_ops: int
    write_ops: int


@dataclass
class Snapshot:
    """What one scrape saw; built by ``gather``, read by ``HostCollector``."""

    vms: list[VmStatus]
    uuids_with_nics: dict[str, list[str]]             # vm uuid -> NIC ids
    blockstats: dict[str, list[BlockStats]] = field(default_factory=dict)
    partial: bool = False
    duration_s: float = 0.0
    cluster: ClusterView | None = None                 # None: a standalone host


@dataclass
class ClusterView:
    """This host's name and cluster, and ``ClusterRuntime.status()`` (None when it did
    not answer within the scrape budget)."""

    cluster: str
    host: str
    status: dict[str, Any] | None


async def gather(service: Any, budget_s: float = SCRAPE_BUDGET_S) -> Snapshot:
    """Read the VM list and, within ``budget_s``, every running QEMU's block stats."""
    started = time.monotonic()
    vms = service.vms.list()
    nics = {vm.uuid: [nic["id"] for nic in vm.nics] for vm in vms}
    snapshot = Snapshot(vms=vms, uuids_with_nics=nics)
    cluster = getattr(service, "cluster", None)
    # etcd calls block: a thread, started first so that it runs beside the QMP calls
    status_task = (asyncio.ensure_future(asyncio.to_thread(cluster.status))
                   if cluster is not None else None)
    processes = {vm.uuid: service.vms.runtimes[vm.uuid].process for vm in vms
                 if vm.uuid in service.vms.runtimes
                 and service.vms.runtimes[vm.uuid].process is not None}
    if processes:
        tasks = {uuid: asyncio.ensure_future(_blockstats(proc))
                 for uuid, proc in processes.items()}
        done, pending = await asyncio.wait(tasks.values(), timeout=budget_s)
        for task in pending:
            task.cancel()
        snapshot.partial = bool(pending)
        for uuid, task in tasks.items():
            if task in done and task.exception() is None:
                snapshot.blockstats[uuid] = task.result()
            elif task in done:
                snapshot.partial = True
    if status_task is not None:
        snapshot.cluster = await _cluster_view(cluster, status_task,
                                               budget_s - (time.monotonic() - started))
        snapshot.partial |= snapshot.cluster.status is None
    snapshot.duration_s = time.monotonic() - started
    return snapshot


async def _cluster_view(cluster: Any, task: asyncio.Future, left_s: float) -> ClusterView:
    try:
        status = await asyncio.wait_for(task, timeout=max(left_s, 0.05))
    except Exception:       # too slow, or etcd failed in a way status() did not catch
        status = None
    settings = cluster.settings
    return ClusterView(settings.name, settings.host, status)


async def _blockstats(process: Any) -> list[BlockStats]:
    reply = await process.qmp.execute("query-blockstats", timeout=SCRAPE_BUDGET_S)
    found = []
    for entry in reply:
        # -blockdev devices have no "device" name; the qdev id names the guest's disk
        name = entry.get("qdev") or entry.get("device") or entry.get("node-name", "?")
        stats = entry.get("stats", {})
        found.append(BlockStats(name.rsplit("/", 1)[-1].removesuffix("/virtio-backend"),
                                stats.get("rd_bytes", 0), stats.get("wr_bytes", 0),
                                stats.get("rd_operations", 0), stats.get("wr_operations", 0)))
    return found


def render(service: Any, snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of ``snapshot`` (a fresh registry per scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(service, snapshot))
    return generate_latest(registry)


class HostCollector:
    """A custom collector: yields families computed from one ``Snapshot``."""

    def __init__(self, service: Any, snapshot: Snapshot) -> None:
        self.service = service
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._host_families()
        if self.snapshot.cluster is not None:
            yield from cluster_families(self.snapshot.cluster)
        yield from self._vm_families()
        yield from self._device_families()
        yield from self._scrape_families()

    # --- host ------------------------------------------------------------------------
    def _host_families(self) -> Iterator[Metric]:
        vms = GaugeMetricFamily("parvisor_vms", "VMs on this host by state.", labels=["state"])
        for state in VmState:
            vms.add_metric([state.value], sum(vm.state == state for vm in self.snapshot.vms))
        yield vms
        committed = sum(vm.memory_current_bytes or vm.memory_bytes
                        for vm in self.snapshot.vms if vm.pid is not None)
        yield GaugeMetricFamily("parvisor_memory_committed_bytes",
                                "Guest memory held by running QEMUs (current size).",
                                value=committed)
        meminfo = read_meminfo()
        yield GaugeMetricFamily("parvisor_host_memory_total_bytes",
                                "Host memory (MemTotal).", value=meminfo.get("MemTotal", 0))
        yield GaugeMetricFamily("parvisor_host_memory_free_bytes",
                                "Host memory available for new VMs (MemAvailable).",
                                value=meminfo.get("MemAvailable", 0))
        jobs = GaugeMetricFamily("parvisor_jobs", "Jobs known to the service by status.",
                                 labels=["status"])
        listed = self.service.jobs.list()
        for status in JobStatus:
            jobs.add_metric([status.value], sum(job.status == status for job in listed))
        yield jobs

    # --- per VM ----------------------------------------------------------------------
    def _vm_families(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("parvisor_vm_info", "One series per VM; value 1.",
                                 labels=["vm", "uuid", "state", "heartbeat"])
        vcpus = GaugeMetricFamily("parvisor_vm_vcpus", "vCPUs assigned.", labels=["vm"])
        memory = GaugeMetricFamily("parvisor_vm_memory_bytes", "Startup memory assigned.",
                                   labels=["vm"])
        actual = GaugeMetricFamily("parvisor_vm_memory_actual_bytes",
                                   "Memory the guest has now (balloon / virtio-mem).",
                                   labels=["vm"])
        uptime = GaugeMetricFamily("parvisor_vm_uptime_seconds", "Seconds since QEMU started.",
                                   labels=["vm"])
        cpu = CounterMetricFamily("parvisor_vm_cpu_seconds", "CPU time of the VM's QEMU "
                                  "process (vCPUs and device emulation).", labels=["vm"])
        for vm in self.snapshot.vms:
            info.add_metric([vm.name, vm.uuid, vm.state.value, vm.heartbeat], 1)
            vcpus.add_metric([vm.name], vm.vcpus)
            memory.add_metric([vm.name], vm.memory_bytes)
            if vm.pid is None:
                continue
            if vm.memory_current_bytes is not None:
                actual.add_metric([vm.name], vm.memory_current_bytes)
            uptime.add_metric([vm.name], vm.uptime_s or 0.0)
            seconds = process_cpu_seconds(vm.pid)
            if seconds is not None:
                cpu.add_metric([vm.name], seconds)
        yield from (info, vcpus, memory, actual, uptime, cpu)

    def _device_families(self) -> Iterator[Metric]:
        families = {key: CounterMetricFamily(f"parvisor_vm_{key}", text, labels=labels)
                    for key, text, labels in _DEVICE_FAMILIES}
        for vm in self.snapshot.vms:
            for disk in self.snapshot.blockstats.get(vm.uuid, []):
                labels = [vm.name, disk.device]
                families["disk_read_bytes"].add_metric(labels, disk.read_bytes)
                families["disk_written_bytes"].add_metric(labels, disk.written_bytes)
                families["disk_read_ops"].add_metric(labels, disk.read_ops)
                families["disk_write_ops"].add_metric(labels, disk.write_ops)
            if vm.pid is None:
                continue
            for nic_id in self.snapshot.uuids_with_nics.get(vm.uuid, []):
                _add_nic(families, vm.name, nic_id, tap_name(vm.uuid, nic_id))
        yield from families.values()

    def _scrape_families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("parvisor_scrape_duration_seconds",
                                "Time spent gathering QEMU statistics for this scrape.",
                                value=self.snapshot.duration_s)
        yield GaugeMetricFamily("parvisor_scrape_partial", "1 when some QEMU did not "
                                "answer within the scrape budget.",
                                value=int(self.snapshot.partial))


# --- cluster (only on cluster members) ---------------------------------------------------
HOST_HEALTH = ("up", "maintenance", "down")      # parvisor.cluster.status._host


def cluster_families(view: ClusterView) -> Iterator[Metric]:
    """Quorum and manager as this host sees them, its own lease, and the cluster's hosts
    by health. Without an answer in time only info and quorum (0) are exported."""
    status = view.status or {}
    info = GaugeMetricFamily("parvisor_cluster_info", "This host's cluster; value 1.",
                             labels=["cluster", "host"])
    info.add_metric([view.cluster, view.host], 1)
    yield info
    yield GaugeMetricFamily("parvisor_cluster_quorum", "1 when this host reaches a quorum "
                            "of the cluster's etcd (0 also when etcd did not answer within "
                            "the scrape budget).", value=int(bool(status.get("quorum"))))
    if not status.get("quorum"):
        return
    hosts = status.get("hosts", [])
    me = next((h for h in hosts if h["name"] == view.host), None)
    yield GaugeMetricFamily("parvisor_cluster_manager", "1 when this host is the cluster "
                            "manager (places and restarts VMs).",
                            value=int(status.get("manager") == view.host))
    yield GaugeMetricFamily("parvisor_cluster_member", "1 when this host holds a live "
                            "membership lease.", value=int(bool(me and me["member"])))
    fenced = (status.get("this_host") or {}).get("fenced")
    if fenced is not None:
        yield GaugeMetricFamily("parvisor_cluster_fenced", "1 when this host has fenced "
                                "itself (lost its lease: its VMs are stopped).",
                                value=int(fenced))
    if me and me.get("lease_age_s") is not None:
        yield GaugeMetricFamily("parvisor_cluster_lease_age_seconds", "Seconds since this "
                                "host's lease was last renewed (etcd's whole seconds).",
                                value=me["lease_age_s"])
        yield GaugeMetricFamily("parvisor_cluster_lease_ttl_seconds", "TTL this host's "
                                "lease was granted with.", value=me["lease_ttl_s"])
    by_health = GaugeMetricFamily("parvisor_cluster_hosts", "Registered hosts of the "
                                  "cluster by health.", labels=["health"])
    for health in HOST_HEALTH:
        by_health.add_metric([health], sum(h["health"] == health for h in hosts))
    yield by_health
    member = GaugeMetricFamily("parvisor_cluster_host_member", "1 when the host holds a "
                               "live membership lease (as this host sees it).",
                               labels=["host"])
    for host in hosts:
        member.add_metric([host["name"]], int(bool(host["member"])))
    yield member
    voters = [m for m in status.get("etcd", []) if m.get("voter")]
    yield GaugeMetricFamily("parvisor_cluster_etcd_voters", "Voting etcd members "
                            "(hosts and witness).", value=len(voters))
    yield GaugeMetricFamily("parvisor_cluster_etcd_voters_reachable", "Voting etcd "
                            "members this host reached.",
                            value=sum(bool(m.get("reachable")) for m in voters))
    yield from replication_families(status.get("vms", []), time.time())


def replication_families(vms: list[dict[str, Any]], now: float) -> Iterator[Metric]:
    """Per replicated VM (``cluster status`` carries the records): its state (one
    series per state, 1 for the current one), bytes behind, generation, and the RPO:
    the seconds of writes a failover now would lose (0: none; async: the age of the last
    consistent point; absent when unknown)."""
    records = [(vm["name"], vm["replication"]) for vm in vms if vm.get("replication")]
    if not records:
        return
    state = GaugeMetricFamily("parvisor_replication_state", "1 for the replication state "
                              "a VM is in.", labels=["vm", "state"])
    behind = GaugeMetricFamily("parvisor_replication_bytes_behind", "Bytes the replica "
                               "is behind (copy or resync left, async changes not shipped).",
                               labels=["vm"])
    generation = GaugeMetricFamily("parvisor_replication_generation", "The replica set's "
                                   "generation (one more at every failover).", labels=["vm"])
    rpo = GaugeMetricFamily("parvisor_replication_rpo_seconds", "Seconds of writes a "
                            "failover now would lose (0 for sync in-sync).", labels=["vm"])
    for name, record in records:
        for candidate in ReplicationState:
            state.add_metric([name, candidate.value], int(record["state"] == candidate.value))
        behind.add_metric([name], record.get("bytes_behind") or 0)
        generation.add_metric([name], record["generation"])
        seconds = replication_rpo(record, now)
        if seconds is not None:
            rpo.add_metric([name], seconds)
    yield from (state, behind, generation, rpo)


def replication_rpo(record: dict[str, Any], now: float) -> float | None:
    if record["mode"] == "sync" and record["state"] == "in-sync":
        return 0.0
    point = record.get("last_consistent_at")
    usable = record["state"] in ("in-sync", "lagging", "broken")
    return max(0.0, now - point) if usable and point is not None else None


_DISK = ["vm", "device"]
_NIC = ["vm", "nic"]
_DEVICE_FAMILIES = (
    ("disk_read_bytes", "Bytes read by the guest from a disk.", _DISK),
    ("disk_written_bytes", "Bytes written by the guest to a disk.", _DISK),
    ("disk_read_ops", "Read operations on a disk.", _DISK),
    ("disk_write_ops", "Write operations on a disk.", _DISK),
    ("network_receive_bytes", "Bytes the guest received on a NIC.", _NIC),
    ("network_transmit_bytes", "Bytes the guest sent on a NIC.", _NIC),
    ("network_receive_packets", "Packets the guest received on a NIC.", _NIC),
    ("network_transmit_packets", "Packets the guest sent on a NIC.", _NIC),
)
# The tap is the host's end of the cable: what it transmits, the guest receives.
_TAP_COUNTERS = (("network_receive_bytes", "tx_bytes"), ("network_transmit_bytes", "rx_bytes"),
                 ("network_receive_packets", "tx_packets"),
                 ("network_transmit_packets", "rx_packets"))


def _add_nic(families: dict[str, CounterMetricFamily], vm: str, nic_id: str,
             tap: str) -> None:
    for key, counter in _TAP_COUNTERS:
        value = read_int(SYS_NET / tap / "statistics" / counter)
        if value is not None:
            families[key].add_metric([vm, nic_id], value)


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (the kernel prints kB)."""
    found = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            found[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return found


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """utime + stime of ``pid`` (fields 14 and 15 of ``stat``), in seconds."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and ')': split after the last ')'
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
