"""A thin, typed layer over etcd's v3 JSON gateway (via ``etcd3gw``), with endpoint
failover. Used by the etcd store and the etcd cluster environment.

Why etcd3gw (pinned 2.7.0) and not aetcd or etcd3: etcd3 is unmaintained and breaks
with current protobuf; aetcd is asyncio + grpcio (a large binary wheel) while the agent
loop needs plain blocking calls with hard timeouts, which the HTTP gateway of etcd 3.4
gives with ``requests`` alone. We use its session/TLS handling and ``post`` and build
transactions ourselves, so every write is a ``Txn`` with explicit compares.

Never: retry a write on another endpoint after a *timeout* (it may have committed);
only connection failures (nothing was sent) move on to the next endpoint.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as gw_errors

from parvisor.cluster.env import ClusterUnavailable
from parvisor.errors import StoreError


CONNECT_TIMEOUT_S = 0.3      # TCP connect to an etcd member (a LAN: well under 10 ms)


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


# --- building blocks of a Txn (the gateway's JSON shapes) -------------------------------
def cmp_mod(key: str, revision: int, result: str = "EQUAL") -> dict:
    return {"key": b64(key), "target": "MOD", "result": result, "mod_revision": revision}


def cmp_absent(key: str) -> dict:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}


def cmp_present(key: str) -> dict:
    return {"key": b64(key), "target": "CREATE", "result": "GREATER", "create_revision": 0}


def op_put(key: str, value: bytes | str, lease: int = 0) -> dict:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = lease
    return {"request_put": body}


def op_delete(key: str) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


def op_get(key: str) -> dict:
    return {"request_range": {"key": b64(key)}}


class EtcdKV:
    def __init__(self, endpoints: list[str], *, timeout_s: float = 2.0,
                 tls: TlsFiles | None = None) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoints given")
        self.tls = tls
        self._clients = [self._client(url, timeout_s, tls) for url in endpoints]
        self.endpoints = list(endpoints)

    @staticmethod
    def _client(url: str, timeout_s: float, tls: TlsFiles | None) -> etcd3gw.Etcd3Client:
        parts = urlsplit(url)
        # trust_env off: REQUESTS_CA_BUNDLE would silently replace our cluster CA and
        # HTTP(S)_PROXY would route cluster traffic through a proxy.
        session = requests.Session()
        session.trust_env = False
        if tls is not None:
            session.verify = tls.ca
            session.cert = (tls.cert, tls.key)
        client = etcd3gw.Etcd3Client(host=parts.hostname or "127.0.0.1",
                                     port=parts.port or 2379, protocol=parts.scheme or "http",
                                     timeout=timeout_s, api_path="/v3/", session=session)
        # A short connect timeout of its own (requests takes (connect, read)): a dead
        # member must cost little before the next endpoint is tried, or the agent's
        # keepalive would sit out its fence margin on one unreachable address.
        client.timeout = (min(CONNECT_TIMEOUT_S, timeout_s), timeout_s)
        return client

    def call(self, path: str, body: dict) -> dict:
        """POST to the first endpoint that accepts a connection."""
        failures = []
        for index, client in enumerate(self._clients):
            try:
                result = client.post(client.get_url(path), json=body)
            except gw_errors.ConnectionFailedError as exc:
                failures.append(f"{self.endpoints[index]}: {exc}")
                continue
            except gw_errors.ConnectionTimeoutError as exc:
                if not _connect_timeout(exc):
                    raise ClusterUnavailable(f"etcd request {path} failed: {exc}",
                                             endpoint=self.endpoints[index]) from exc
                # the TCP connect timed out: nothing was sent, the next endpoint may
                # answer (a dead host's member first in the list held every call 2 s
                # and failed it, so a survivor could not fail a VM over)
                failures.append(f"{self.endpoints[index]}: connect timeout")
                continue
            except gw_errors.Etcd3Exception as exc:
                # timeouts included: the request may have been applied; do not resend
                raise ClusterUnavailable(f"etcd request {path} failed: {exc}",
                                         endpoint=self.endpoints[index]) from exc
            if index:   # keep the working endpoint first
                self._clients.insert(0, self._clients.pop(index))
                self.endpoints.insert(0, self.endpoints.pop(index))
            return result
        raise ClusterUnavailable("no etcd endpoint reachable", failures=failures)

    # --- kv -------------------------------------------------------------------------
    def txn(self, compare: list[dict], success: list[dict],
            failure: list[dict] | None = None) -> tuple[bool, int, list[dict]]:
        """Run one transaction: (succeeded, revision after it, responses)."""
        reply = self.call("/kv/txn", {"compare": compare, "success": success,
                                      "failure": failure or []})
        revision = int(reply.get("header", {}).get("revision", 0))
        return bool(reply.get("succeeded", False)), revision, reply.get("responses", [])

    def get(self, key: str) -> KeyValue | None:
        items, _ = self._range({"key": b64(key)})
        return items[0] if items else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the revision of the read."""
        return self._range({"key": b64(prefix), "range_end": prefix_end(prefix),
                            "sort_order": "ASCEND", "sort_target": "KEY"})

    def range(self, start: str, end: str, *, revision: int = 0, limit: int = 0,
              descending: bool = False) -> tuple[list[KeyValue], int]:
        """Keys in [start, end) sorted by key, at ``revision`` (0: now), at most
        ``limit`` (0: all); and the revision of the read."""
        body: dict[str, Any] = {"key": b64(start), "range_end": b64(end),
                                "sort_order": "DESCEND" if descending else "ASCEND",
                                "sort_target": "KEY"}
        if revision:
            body["revision"] = revision
        if limit:
            body["limit"] = limit
        return self._range(body)

    def _range(self, body: dict) -> tuple[list[KeyValue], int]:
        reply = self.call("/kv/range", body)
        return parse_kvs(reply.get("kvs", [])), int(reply.get("header", {}).get("revision", 0))

    # --- leases ---------------------------------------------------------------------
    def grant(self, ttl_s: float) -> int:
        reply = self.call("/lease/grant", {"TTL": max(1, round(ttl_s))})
        return int(reply["ID"])

    def keepalive(self, lease_id: int) -> bool:
        reply = self.call("/lease/keepalive", {"ID": lease_id})
        # keepalive is a streaming RPC: the gateway answers 200 with {"error": ...} when
        # the member cannot renew (no leader, minority). That is "unavailable", never
        # "lease gone" (that is a result with TTL 0): mixing them up fences on a blip.
        if "error" in reply or "result" not in reply:
            raise ClusterUnavailable(f"lease keepalive failed: {reply.get('error', reply)}")
        return int(reply["result"].get("TTL", 0)) > 0

    def revoke(self, lease_id: int) -> None:
        self.call("/kv/lease/revoke", {"ID": lease_id})

    def status(self) -> dict:
        return self.call("/maintenance/status", {})


def _connect_timeout(exc: BaseException) -> bool:
    """etcd3gw turns requests' ConnectTimeout (nothing sent) and ReadTimeout (maybe
    applied) into one ConnectionTimeoutError; the cause tells them apart."""
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, requests.exceptions.ConnectTimeout)


def parse_kvs(raw: list[dict]) -> list[KeyValue]:
    return [KeyValue(unb64(item["key"]).decode(), unb64(item.get("value", "")),
                     int(item.get("mod_revision", 0)), int(item.get("create_revision", 0)),
                     int(item.get("lease", 0)))
            for item in raw]
