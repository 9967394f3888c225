"""Cluster figures of ``/metrics`` (``parvisor.metrics.cluster_families``) from a fake
cluster view: names, labels and values as ``docs/metrics.md`` lists them, parsed back
with the Prometheus text parser. The same figures from a real etcd are checked in
``tests/integration/test_metrics_etcd.py``."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from parvisor import metrics


def _status(**changes):
    status = {
        "cluster": "prod", "quorum": True, "manager": "a",
        "etcd": [{"name": "a", "voter": True, "reachable": True, "leader": True},
                 {"name": "b", "voter": True, "reachable": False, "leader": False},
                 {"name": "w", "voter": True, "reachable": True, "leader": False}],
        "hosts": [
            {"name": "a", "member": True, "health": "up", "lease_age_s": 2, "lease_ttl_s": 8},
            {"name": "b", "member": False, "health": "down", "lease_age_s": None,
             "lease_ttl_s": None},
            {"name": "c", "member": True, "health": "maintenance", "lease_age_s": 1,
             "lease_ttl_s": 8}],
        "this_host": {"name": "a", "fenced": False}}
    return {**status, **changes}


class FakeCluster:
    def __init__(self, status, host="a", gate: threading.Event | None = None):
        self._status, self.gate = status, gate
        self.settings = SimpleNamespace(name="prod", host=host)

    def status(self):
        if self.gate is not None:
            self.gate.wait(10)          # etcd that does not answer (until the test is done)
        return self._status


def _scrape(cluster, budget_s=metrics.SCRAPE_BUDGET_S) -> dict[str, dict[tuple, float]]:
    service = SimpleNamespace(vms=SimpleNamespace(list=lambda: [], runtimes={}),
                              jobs=SimpleNamespace(list=lambda: []), cluster=cluster)

    async def scrape():
        snapshot = await metrics.gather(service, budget_s)
        if cluster is not None and cluster.gate is not None:
            cluster.gate.set()      # let the stuck status() end: asyncio.run waits for it
        return snapshot
    snapshot = asyncio.run(scrape())
    text = metrics.render(service, snapshot).decode()
    return {family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
            for family in text_string_to_metric_families(text)}


def test_a_healthy_member_exports_quorum_manager_lease_and_hosts():
    found = _scrape(FakeCluster(_status()))
    assert found["parvisor_cluster_info"] == {(("cluster", "prod"), ("host", "a")): 1}
    assert found["parvisor_cluster_quorum"] == {(): 1}
    assert found["parvisor_cluster_manager"] == {(): 1}
    assert found["parvisor_cluster_member"] == {(): 1}
    assert found["parvisor_cluster_fenced"] == {(): 0}
    assert found["parvisor_cluster_lease_age_seconds"] == {(): 2}
    assert found["parvisor_cluster_lease_ttl_seconds"] == {(): 8}
    assert found["parvisor_cluster_hosts"] == {(("health", "up"),): 1,
                                               (("health", "maintenance"),): 1,
                                               (("health", "down"),): 1}
    assert found["parvisor_cluster_host_member"] == {(("host", "a"),): 1, (("host", "b"),): 0,
                                                     (("host", "c"),): 1}
    assert found["parvisor_cluster_etcd_voters"] == {(): 3}
    assert found["parvisor_cluster_etcd_voters_reachable"] == {(): 2}
    assert found["parvisor_scrape_partial"] == {(): 0}


def test_another_host_is_not_the_manager():
    found = _scrape(FakeCluster(_status(), host="c"))
    assert found["parvisor_cluster_manager"] == {(): 0}
    assert found["parvisor_cluster_lease_age_seconds"] == {(): 1}


def test_lost_quorum_exports_zero_and_no_stale_figures():
    found = _scrape(FakeCluster(_status(quorum=False, hosts=[], manager=None,
                                        error="etcd unavailable")))
    assert found["parvisor_cluster_quorum"] == {(): 0}
    assert "parvisor_cluster_info" in found
    for name in ("parvisor_cluster_manager", "parvisor_cluster_lease_age_seconds",
                 "parvisor_cluster_hosts"):
        assert name not in found


def test_etcd_slower_than_the_budget_is_no_quorum_and_a_partial_scrape():
    found = _scrape(FakeCluster(_status(), gate=threading.Event()), budget_s=0.2)
    assert found["parvisor_cluster_quorum"] == {(): 0}
    assert found["parvisor_scrape_partial"] == {(): 1}
    assert "parvisor_cluster_manager" not in found


def test_a_standalone_host_has_no_cluster_figures():
    found = _scrape(None)
    assert not [name for name in found if name.startswith("parvisor_cluster_")]
    assert found["parvisor_vms"]


def test_replicated_vms_export_state_bytes_behind_generation_and_rpo():
    def record(mode, state, point, behind=0, generation=1):
        return {"mode": mode, "state": state, "last_consistent_at": point,
                "bytes_behind": behind, "generation": generation}
    now = 1_800_000_000.0
    vms = [{"name": "web", "replication": record("sync", "in-sync", now - 500)},
           {"name": "db", "replication": record("async", "lagging", now - 95, 4096, 2)},
           {"name": "new", "replication": record("sync", "initial-sync", None, 1 << 20)},
           {"name": "plain", "replication": None}]
    families = {f.name: f for f in metrics.replication_families(vms, now)}
    samples = {name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
               for name, f in families.items()}
    state = samples["parvisor_replication_state"]
    assert state[(("state", "in-sync"), ("vm", "web"))] == 1
    assert state[(("state", "broken"), ("vm", "web"))] == 0
    assert state[(("state", "lagging"), ("vm", "db"))] == 1
    assert {vm for (_, (_, vm)), v in state.items() if v} == {"web", "db", "new"}
    assert samples["parvisor_replication_rpo_seconds"] == {(("vm", "web"),): 0.0,
                                                           (("vm", "db"),): 95.0}
    assert samples["parvisor_replication_bytes_behind"][(("vm", "new"),)] == 1 << 20
    assert samples["parvisor_replication_generation"][(("vm", "db"),)] == 2
    scraped = _scrape(FakeCluster(_status(vms=vms)))      # rendered with the rest
    assert scraped["parvisor_replication_generation"] == {(("vm", "web"),): 1,
                                                          (("vm", "db"),): 2,
                                                          (("vm", "new"),): 1}


def test_no_replicated_vm_no_replication_figures():
    assert list(metrics.replication_families([{"name": "a", "replication": None}], 0)) == []
