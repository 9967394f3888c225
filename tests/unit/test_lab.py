"""The lab's pure parts: naming, addresses and the odd etcd voter count."""

from __future__ import annotations

import pytest

from parvisor.errors import InvalidInput
from parvisor.lab import lab as lab_mod


@pytest.fixture(autouse=True)
def fixed_subnet(monkeypatch):
    monkeypatch.setattr(lab_mod, "_free_octet", lambda: 77)


@pytest.mark.parametrize("hosts, witness, voters", [
    (3, False, {"h1", "h2", "h3"}), (2, True, {"h1", "h2", "w"}),
    (2, False, {"h1"}), (3, True, {"h1", "h2", "w"}), (4, True, {"h1", "h2", "h3", "h4", "w"}),
])
def test_etcd_voters_are_odd_and_include_the_witness(hosts, witness, voters):
    state = lab_mod.plan(hosts, witness, {}, True)
    assert {n.name for n in state.nodes.values() if n.etcd} == voters
    assert len(voters) % 2 == 1


def test_names_fit_linux_interface_limits_and_share_the_prefix():
    state = lab_mod.plan(3, True, {"h1": "a"}, True)
    for node in state.nodes.values():
        assert node.ns.startswith(state.prefix) and len(node.link + "p") <= 15
        assert node.ip.startswith("10.231.77.")
    assert state.nodes["h1"].site == "a" and not state.nodes["w"].runs_vms


def test_site_specs():
    assert lab_mod.parse_sites(["a:h1,h2", "b:h3"]) == {"h1": "a", "h2": "a", "h3": "b"}
    with pytest.raises(InvalidInput):
        lab_mod.parse_sites(["nohosts"])
