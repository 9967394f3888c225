"""EtcdKV moves to the next endpoint only when nothing was sent: a refused connection
or a *connect* timeout (a dead host's member first in the list must not fail every
call); a read timeout may have applied a write, so it is never resent."""

from __future__ import annotations

import pytest
import requests
from etcd3gw import exceptions as gw_errors

from parvisor.cluster.env import ClusterUnavailable
from parvisor.cluster.etcd_kv import EtcdKV


def _timeout(cause: Exception) -> gw_errors.ConnectionTimeoutError:
    try:
        raise cause
    except Exception as exc:       # as etcd3gw does: raised inside the except
        try:
            raise gw_errors.ConnectionTimeoutError(str(exc))
        except gw_errors.ConnectionTimeoutError as wrapped:
            return wrapped


class _Client:
    def __init__(self, outcome) -> None:
        self.outcome, self.calls = outcome, 0

    def get_url(self, path: str) -> str:
        return path

    def post(self, url, json=None):
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def kv_with(first, second) -> tuple[EtcdKV, _Client, _Client]:
    kv = EtcdKV(["https://10.0.0.1:2379", "https://10.0.0.2:2379"])
    a, b = _Client(first), _Client(second)
    kv._clients = [a, b]
    return kv, a, b


def test_connect_timeout_moves_on_and_the_working_endpoint_goes_first():
    kv, dead, alive = kv_with(_timeout(requests.exceptions.ConnectTimeout("no SYN-ACK")),
                              {"header": {"revision": "5"}})
    assert kv.call("/kv/range", {}) == {"header": {"revision": "5"}}
    assert kv.endpoints[0] == "https://10.0.0.2:2379"      # next calls skip the dead one
    kv.call("/kv/range", {})
    assert (dead.calls, alive.calls) == (1, 2)


def test_read_timeout_is_not_resent_elsewhere():
    kv, slow, other = kv_with(_timeout(requests.exceptions.ReadTimeout("no answer")), {})
    with pytest.raises(ClusterUnavailable):
        kv.call("/kv/txn", {})
    assert other.calls == 0, "a write that may have been applied was sent twice"
