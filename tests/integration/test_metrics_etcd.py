"""Cluster figures of ``/metrics`` from a real etcd (``parvisor.testing.etcd_fixture``):
two hosts registered the way the agent does it (a lease, a membership key, the manager
key), the status read by the real ``cluster_status`` and exported by
``parvisor.metrics``; then etcd is killed and the next scrape says "no quorum" within
the scrape budget. Only the runtime around ``cluster_status`` is a stand-in (it would
need a whole host service)."""

from __future__ import annotations

import asyncio
import shutil
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from parvisor import metrics
from parvisor.cluster.env import HostRecord
from parvisor.cluster.etcd_env import EtcdEnv
from parvisor.cluster.status import cluster_status
from parvisor.testing.etcd_fixture import EtcdCluster

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd-server is not installed")
TTL_S = 8


class NoLocalHost:
    def log(self, message: str) -> None:
        pass


class Runtime:
    """``ClusterRuntime.status`` without a host service: the real status, this host."""

    def __init__(self, kv, cluster: str, host: str) -> None:
        self.kv = kv
        self.settings = SimpleNamespace(name=cluster, host=host)

    def status(self):
        data = cluster_status(self.kv, self.settings.name)
        data["this_host"] = {"name": self.settings.host, "fenced": False}
        return data


def _scrape(runtime) -> dict[str, dict[tuple, float]]:
    service = SimpleNamespace(vms=SimpleNamespace(list=lambda: [], runtimes={}),
                              jobs=SimpleNamespace(list=lambda: []), cluster=runtime)
    started = time.monotonic()
    snapshot = asyncio.run(metrics.gather(service))
    # the budget is behaviour: a scraper must get an answer (margin: 1 s for the thread)
    assert time.monotonic() - started < metrics.SCRAPE_BUDGET_S + 1.0
    text = metrics.render(service, snapshot).decode()
    return {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def test_cluster_figures_from_a_real_etcd(tmp_path):
    etcd = EtcdCluster(tmp_path / "etcd", size=1)
    try:
        etcd.start()
        kv = etcd.kv(timeout_s=1.0)
        hosts = {name: EtcdEnv(kv, "metrics", name, NoLocalHost()) for name in ("a", "b")}
        leases = {name: env.lease_grant(TTL_S) for name, env in hosts.items()}
        for name, env in hosts.items():
            env.register(leases[name], HostRecord(name, 1 << 30, 2))
        assert hosts["a"].campaign(leases["a"])
        hosts["b"].lease_revoke(leases["b"])      # b "died": registered, no membership

        found = _scrape(Runtime(kv, "metrics", "a"))
        assert found["parvisor_cluster_info"] == {(("cluster", "metrics"), ("host", "a")): 1}
        assert found["parvisor_cluster_quorum"] == {(): 1}
        assert found["parvisor_cluster_manager"] == {(): 1}
        assert found["parvisor_cluster_member"] == {(): 1}
        assert 0 <= found["parvisor_cluster_lease_age_seconds"][()] <= TTL_S
        assert found["parvisor_cluster_lease_ttl_seconds"] == {(): TTL_S}
        assert found["parvisor_cluster_hosts"] == {(("health", "up"),): 1,
                                                   (("health", "maintenance"),): 0,
                                                   (("health", "down"),): 1}
        assert found["parvisor_cluster_host_member"] == {(("host", "a"),): 1,
                                                         (("host", "b"),): 0}
        assert found["parvisor_cluster_etcd_voters"] == {(): 1}
        assert found["parvisor_cluster_etcd_voters_reachable"] == {(): 1}
        assert _scrape(Runtime(kv, "metrics", "b"))["parvisor_cluster_member"] == {(): 0}

        etcd.kill_member(etcd.members[0])
        lost = _scrape(Runtime(kv, "metrics", "a"))
        assert lost["parvisor_cluster_quorum"] == {(): 0}
        assert "parvisor_cluster_manager" not in lost
    finally:
        etcd.close()
