"""The cluster API's credentials (parvisor.cluster.host_api): one token per cluster, kept
in a real etcd member, the same for every host; a server certificate from the cluster CA
for the host's API address; what a host without the CA key does; the settings."""

from __future__ import annotations


import pytest
from cryptography import x509

from parvisor.cluster import certs
from parvisor.cluster.host_api import (api_url, ensure_api_certificate, ensure_cluster_token,
                                       prepare_cluster_api)
from parvisor.cluster.settings import ClusterSettings
from parvisor.errors import InvalidInput, NotFound


def settings_in(pki, **extra) -> ClusterSettings:
    return ClusterSettings(name="t", host="h1", endpoints=("https://127.0.0.1:2379",),
                           ca=pki / "ca.crt", cert=pki / "h.crt", key=pki / "h.key",
                           migration_address="10.9.0.1", **extra)




def test_every_member_reads_the_same_token_created_once(etcd):
    first = ensure_cluster_token(etcd.kv(), "/parvisor/tok1/")
    second = ensure_cluster_token(etcd.kv(), "/parvisor/tok1/")
    other_cluster = ensure_cluster_token(etcd.kv(), "/parvisor/tok2/")
    assert first == second and len(first) >= 40 and other_cluster != first


def test_certificate_for_the_api_address_from_the_cluster_ca(tmp_path):
    pki = tmp_path / "pki"
    certs.make_ca(pki, "t")
    settings = settings_in(pki, api_port=8444)
    assert api_url(settings) == "https://10.9.0.1:8444"
    pair = ensure_api_certificate(settings, tmp_path / "cluster")
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.9.0.1"]
    (pki / "ca.key").unlink()       # issued once: later starts need no CA key
    assert ensure_api_certificate(settings, tmp_path / "cluster") == pair


def test_without_ca_key_the_api_is_not_served_but_forwarding_works(tmp_path, etcd):
    pki = tmp_path / "pki"
    certs.make_ca(pki, "t")
    (pki / "ca.key").unlink()
    settings = settings_in(pki, api_port=8444)
    with pytest.raises(NotFound, match="ca.key"):
        ensure_api_certificate(settings, tmp_path / "cluster")
    api = prepare_cluster_api(settings, tmp_path / "cluster", etcd.kv(), "/parvisor/nokey/")
    assert api.url == "" and api.token      # others get a clear 503; we still forward


def test_api_settings(tmp_path):
    assert api_url(settings_in(tmp_path)) == ""                     # api_port 0: not served
    assert api_url(settings_in(tmp_path, api_port=9000, api_address="fd00::5")) == \
        "https://[fd00::5]:9000"
    table = {"name": "t", "endpoints": ["https://10.0.0.1:2379"], "ca": "/p/ca.crt",
             "cert": "/p/h.crt", "key": "/p/h.key"}
    with pytest.raises(InvalidInput, match="api_port"):
        ClusterSettings.from_table({**table, "api_port": 70000}, "h1")
    again = ClusterSettings.from_table({**table, "api_port": 8444, "api_address": "10.0.0.7"},
                                       "h1")
    assert again.api_ip() == "10.0.0.7"
