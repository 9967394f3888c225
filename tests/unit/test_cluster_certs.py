"""Cluster certificates: etcd (real member, client-cert auth) accepts them and refuses
a client without one."""

from __future__ import annotations

import shutil
import stat

import pytest

from parvisor.cluster.certs import issue, make_ca
from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import EtcdKV, TlsFiles, op_put
from parvisor.testing.etcd_fixture import EtcdCluster


def test_keys_are_private(tmp_path):
    ca = make_ca(tmp_path, "c1")
    leaf = issue(ca, tmp_path, "h1", server=False)
    for key in (ca.key, leaf.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")
def test_etcd_accepts_our_client_certificate_and_refuses_none(tmp_path):
    ca = make_ca(tmp_path / "pki", "c1")
    server = issue(ca, tmp_path / "pki", "etcd-m1", server=True)
    client = issue(ca, tmp_path / "pki", "host-h1", server=False)
    cluster = EtcdCluster(tmp_path / "etcd", size=1,
                          tls=TlsFiles(str(ca.cert), str(client.cert), str(client.key)),
                          server_cert=TlsFiles(str(ca.cert), str(server.cert), str(server.key)))
    try:
        cluster.start()
        ok, _, _ = cluster.kv().txn([], [op_put("/tls/ok", "1")])
        assert ok
        no_cert = EtcdKV(cluster.endpoints, timeout_s=2.0,
                         tls=TlsFiles(str(ca.cert), "", ""))
        no_cert._clients[0].session.cert = None
        with pytest.raises(ClusterUnavailable):
            no_cert.txn([], [op_put("/tls/denied", "1")])
    finally:
        cluster.close()
