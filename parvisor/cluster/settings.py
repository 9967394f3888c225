"""The ``[cluster]`` section of a host's config.toml: which etcd, which certificates,
which host name, and the timings.

What for: ``parvisor.config`` keeps the raw table (so this module stays import-light
and the host config stays a plain dataclass); ``ClusterSettings.from_table`` validates
it when the config is loaded and again when the service starts the cluster runtime.
``render`` writes the section back (``cluster create``/``join`` append it).

Never: accept a cluster section without TLS files: cluster traffic is authenticated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from parvisor.errors import InvalidInput
from parvisor.model.vm import validate_name


CLUSTER_API_PORT = 8444     # what cluster create/join and the lab set (8443: listen_tcp's)


@dataclass(frozen=True)
class ClusterSettings:
    name: str
    host: str
    endpoints: tuple[str, ...]
    ca: Path
    cert: Path
    key: Path
    lease_ttl_s: float = 8.0
    keepalive_interval_s: float = 1.0
    fence_margin_s: float = 2.5
    recovery_grace_s: float = 1.5
    shared_storage: Path | None = None      # the cluster storage path, if this host has it
    site: str = ""
    tick_s: float = 0.25                    # agent loop period (keepalives are paced inside)
    # live migration: the address other hosts reach this one on for the memory stream
    # (empty: the address this host uses towards its first etcd endpoint)
    migration_address: str = ""
    max_concurrent_migrations: int = 2      # outgoing, per host; more wait their turn
    # encrypt migration streams (QEMU TLS, certificates from the cluster CA); off by
    # default like Hyper-V's, for a dedicated migration network: TLS costs CPU per byte
    migration_tls: bool = False
    # the cluster API: this host's API on TCP for the other members (forwarded requests
    # about VMs it owns). TLS with a certificate from the cluster CA, the cluster token
    # from etcd (parvisor.cluster.host_api). 0 = not served (forwarding out still works).
    api_port: int = 0
    api_address: str = ""                   # empty: migration_ip()

    @classmethod
    def from_table(cls, table: dict[str, Any], host_name: str, where: str = "") -> "ClusterSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(table) - known
        if unknown:
            raise InvalidInput(f"{where}[cluster]: unknown keys {sorted(unknown)}")
        missing = {"name", "endpoints", "ca", "cert", "key"} - set(table)
        if missing:
            raise InvalidInput(f"{where}[cluster]: missing keys {sorted(missing)}")
        data = dict(table)
        data.setdefault("host", host_name)
        data["endpoints"] = tuple(data["endpoints"])
        for key in ("ca", "cert", "key"):
            data[key] = Path(data[key])
        if data.get("shared_storage"):
            data["shared_storage"] = Path(data["shared_storage"])
        settings = cls(**data)
        settings.check(where)
        return settings

    def check(self, where: str = "") -> None:
        try:
            validate_name(self.name, "cluster name")
            validate_name(self.host, "host name")
        except ValueError as exc:
            raise InvalidInput(f"{where}[cluster]: {exc}") from exc
        if not self.endpoints or not all(e.startswith("https://") for e in self.endpoints):
            raise InvalidInput(f"{where}[cluster]: endpoints must be https:// URLs "
                               "(etcd with TLS and client certificates)")
        if not 0 < self.fence_margin_s < self.lease_ttl_s:
            raise InvalidInput(f"{where}[cluster]: need 0 < fence_margin_s < lease_ttl_s")
        if not 0 <= self.api_port < 65536:
            raise InvalidInput(f"{where}[cluster]: api_port must be 0 (off) or a TCP port")
        if self.max_concurrent_migrations < 1:
            raise InvalidInput(f"{where}[cluster]: max_concurrent_migrations must be >= 1")
        if not 0 < self.keepalive_interval_s < self.lease_ttl_s - self.fence_margin_s:
            raise InvalidInput(f"{where}[cluster]: keepalive_interval_s must be shorter than "
                               "lease_ttl_s - fence_margin_s (else every host fences itself)")

    def migration_ip(self) -> str:
        """``migration_address``, else the local address of the route to etcd."""
        if self.migration_address:
            return self.migration_address
        import socket
        from urllib.parse import urlsplit
        target = urlsplit(self.endpoints[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target.hostname or "127.0.0.1", target.port or 2379))
            return probe.getsockname()[0]

    def api_ip(self) -> str:
        """The address other members reach this host's cluster API on."""
        return self.api_address or self.migration_ip()

    def render(self) -> str:
        """The TOML section (appended at the end of config.toml: tables come last)."""
        lines = ["", "[cluster]"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            elif isinstance(value, Path):
                value = str(value)
            lines.append(f"{f.name} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"
