"""The cluster API: each member serves its API on TCP for the other members.

What for: any host of a cluster answers for every VM (issue 8). A request about a VM
that another member owns is forwarded to that member's cluster API
(``parvisor.api.forward``). This module makes what that link needs:

* **address**: ``[cluster] api_address`` (default: the migration address) and
  ``api_port`` (0 = not served), published as ``api_url`` in the host's registration;
* **server certificate** issued from the cluster CA for that address (SAN = the IP),
  kept in ``<state>/cluster/api-tls/``; callers verify it against the cluster CA;
* **the cluster token**: one random secret created once, kept in etcd at
  ``/parvisor/<cluster>/apitoken`` and sent as a bearer token. Why a secret in etcd
  and not one derived from the PKI: only holders of a cluster client certificate can
  read etcd (client-cert auth), which is exactly the member set; deriving it from
  ``ca.key`` would need the CA key on every host (the docs say to delete it where it
  is not needed) and could not be rotated without a new CA. Rotation: put a new value
  under the key and restart the services.

Never: serve the cluster API without TLS or without the token; write a private key
readable by others (``certs.issue`` writes 0600).
"""

from __future__ import annotations

import logging
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from parvisor.cluster import certs
from parvisor.cluster.etcd_kv import cmp_absent, op_put
from parvisor.cluster.settings import ClusterSettings
from parvisor.errors import NotFound

log = logging.getLogger("parvisor.cluster")
API_TLS_DIR = "api-tls"
TOKEN_KEY = "apitoken"
TOKEN_BYTES = 32


@dataclass(frozen=True)
class ClusterApi:
    """What the service needs to serve and use the cluster API."""

    url: str                      # "" when this host does not serve it (api_port = 0)
    token: str
    ca: Path                      # verifies the other members' server certificates
    tls: certs.CertPair | None    # this host's server certificate (None: not served)

    @property
    def listen(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("https://").rpartition(":")
        return host.strip("[]"), int(port)

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def api_url(settings: ClusterSettings) -> str:
    if not settings.api_port:
        return ""
    ip = settings.api_ip()
    return f"https://{f'[{ip}]' if ':' in ip else ip}:{settings.api_port}"


def ensure_api_certificate(settings: ClusterSettings, cluster_dir: Path) -> certs.CertPair:
    """The server certificate of this host's cluster API, issued once per address from
    the cluster CA (its key must be next to ca.crt the first time: ``cluster
    create|join`` issue it while they have it)."""
    ip = settings.api_ip()
    directory = cluster_dir / API_TLS_DIR
    pair = certs.CertPair(directory / f"api-{ip}.crt", directory / f"api-{ip}.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    ca_key = settings.ca.with_name("ca.key")
    if not ca_key.exists():
        raise NotFound(f"no certificate for the cluster API on {ip} in {directory} and no "
                       f"{ca_key} to issue one: copy ca.key there once, or set "
                       "api_port = 0", path=str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    return certs.issue(certs.CertPair(settings.ca, ca_key), directory, f"api-{ip}",
                       server=True, hosts=(ip,))


def ensure_cluster_token(kv, prefix: str) -> str:
    """Read the cluster token, creating it first if no member has (first one wins)."""
    key = prefix + TOKEN_KEY
    kv.txn([cmp_absent(key)], [op_put(key, secrets.token_urlsafe(TOKEN_BYTES))])
    item = kv.get(key)
    return item.value.decode()


def prepare_cluster_api(settings: ClusterSettings, cluster_dir: Path, kv,
                        prefix: str) -> ClusterApi:
    """Certificate (if served) and token; etcd must be reachable (ClusterUnavailable)."""
    token = ensure_cluster_token(kv, prefix)
    url, tls = api_url(settings), None
    if url:
        try:
            tls = ensure_api_certificate(settings, cluster_dir)
        except NotFound as exc:     # forwarding out still works; others get a clear 503
            log.error("cluster: the cluster API is not served: %s", exc.message)
            url = ""
    return ClusterApi(url=url, token=token, ca=settings.ca, tls=tls)
