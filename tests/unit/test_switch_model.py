"""Switch definitions: validation and the derived kernel names."""

import pytest

from parvisor.errors import InvalidInput
from parvisor.switch.model import (SwitchDefinition, bridge_mac, bridge_name,
                                   nat_table_name, parse_switch_definition, vlan_bridge_name,
                                   vlan_uplink_name)


@pytest.mark.parametrize("data", [
    {"name": "lan", "type": "external", "uplink": "eth0"},
    {"name": "host-only_1", "type": "internal", "host_address": "10.9.8.1/24"},
    {"name": "int", "type": "internal"},
    {"name": "p", "type": "private"},
    {"name": "n" * 32, "type": "nat", "subnet": "10.213.4.0/24"},
    {"name": "natdefault", "type": "nat"},
])
def test_valid_definitions(data):
    defn = parse_switch_definition(data)
    assert defn.schema_version == 1 and defn.name == data["name"]


@pytest.mark.parametrize("data, fragment", [
    ({"name": "bad name", "type": "private"}, "switch name"),
    ({"name": "x" * 33, "type": "private"}, "switch name"),
    ({"name": "a.b", "type": "private"}, "switch name"),
    ({"name": "", "type": "private"}, "switch name"),
    ({"name": "s", "type": "bogus"}, "type"),
    ({"name": "s", "type": "external"}, "needs an uplink"),
    ({"name": "s", "type": "external", "uplink": "eth0/1"}, "not a valid interface"),
    ({"name": "s", "type": "external", "uplink": "a-very-long-interface"}, "not a valid"),
    ({"name": "s", "type": "private", "host_address": "10.0.0.1/24"}, "takes no host-address"),
    ({"name": "s", "type": "private", "uplink": "eth0"}, "takes no uplink"),
    ({"name": "s", "type": "internal", "subnet": "10.0.0.0/24"}, "takes no subnet"),
    ({"name": "s", "type": "internal", "host_address": "10.0.0.1"}, "prefix length"),
    ({"name": "s", "type": "internal", "host_address": "10.0.0.0/24"}, "network or broadcast"),
    ({"name": "s", "type": "internal", "host_address": "10.0.0.255/24"}, "broadcast"),
    ({"name": "s", "type": "internal", "host_address": "fe80::1/64"}, "IPv4"),
    ({"name": "s", "type": "internal", "host_address": "junk"}, "IPv4"),
    ({"name": "s", "type": "nat", "subnet": "10.0.0.1/24"}, "host bits"),
    ({"name": "s", "type": "nat", "subnet": "10.0.0.0/30"}, "prefix length"),
    ({"name": "s", "type": "nat", "subnet": "10.0.0.0/8"}, "prefix length"),
    ({"name": "s", "type": "private", "color": "red"}, "color"),
    ({"name": "s", "type": "private", "schema_version": 99}, "newer"),
])
def test_invalid_definitions_are_refused_clearly(data, fragment):
    with pytest.raises(InvalidInput) as err:
        parse_switch_definition(data)
    assert fragment in err.value.message


def test_names_are_deterministic_short_and_distinct():
    names = {bridge_name("a"), vlan_bridge_name("a", 4094), vlan_uplink_name("a", 4094),
             bridge_name("b")}
    assert len(names) == 4
    assert all(len(n) <= 15 for n in names)
    assert bridge_name("a") == bridge_name("a") and bridge_name("a").startswith("pvbr-")
    assert len(vlan_bridge_name("x" * 32, 4094)) == 15
    assert nat_table_name("a") == "parvisor_" + bridge_name("a")


def test_bridge_mac_is_locally_administered_unicast():
    mac = bridge_mac("lan")
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01 and len(mac) == 17


def test_gateway_and_network():
    nat = SwitchDefinition(name="n", type="nat", subnet="10.213.9.0/24")
    assert nat.gateway_cidr() == "10.213.9.1/24"
    internal = SwitchDefinition(name="i", type="internal", host_address="192.0.2.7/28")
    assert str(internal.network()) == "192.0.2.0/28"
    assert SwitchDefinition(name="p", type="private").network() is None
