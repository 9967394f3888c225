"""The virtual switch definition and the names derived from it.

A switch is what a VM NIC's ``switch`` field names. Its definition is a versioned
document (``schema_version``) kept by the store; ``upgrade_switch_document`` lifts
older stored versions. Every kernel-facing name (bridge, per-VLAN bridge, VLAN uplink
link, nftables table, bridge MAC) is *derived* here, deterministically, from the switch
name, so a host reboot or a service restart finds or re-creates exactly the same objects.

Name shapes (all <= 15 characters, Linux IFNAMSIZ):

* ``pvbr-<10 hex>``        the switch's bridge (the untagged / VLAN-1 network)
* ``pvb<7 hex>v<vid>``      one bridge per VLAN when the kernel lacks VLAN filtering
* ``pvu<7 hex>v<vid>``      802.1Q link on an external switch's uplink (same fallback)
* ``parvisor_<bridge>``     the nftables table of a NAT switch (family ``ip``)

Taps are ``pv<13 hex>`` (``parvisor.vm.argv.tap_name``): only hex digits follow ``pv``,
so they can never collide with the names above ('r', 'v', 'u', '-' are not hex).

This module must never touch the system: it is pure data and validation.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any, Literal

from parvisor.model.validation import validate_model
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parvisor.errors import InvalidInput

SWITCH_SCHEMA_VERSION = 1
SwitchType = Literal["external", "internal", "private", "nat"]
SWITCH_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# Interface names the kernel accepts: 1-15 bytes, no '/', ':', whitespace; not . or ..
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")
NAT_MIN_PREFIX, NAT_MAX_PREFIX = 16, 29      # room for a gateway and a DHCP range
DEFAULT_VLAN = 1                             # "no VLAN" and VLAN 1 are the same network


def validate_switch_name(value: str) -> str:
    if not isinstance(value, str) or not SWITCH_NAME_RE.match(value):
        raise ValueError(f"switch name {value!r} is not allowed: use 1-32 letters,"
                         " digits, '-' or '_'")
    return value


_OWN_LINK_RE = re.compile(r"^(pv[0-9a-f]{13}|pvbr-[0-9a-f]{10}|pv[bu][0-9a-f]{7}v[0-9]{1,4})$")


def is_parvisor_link(name: str) -> bool:
    """True for the names this layer derives (taps, bridges, VLAN links)."""
    return bool(_OWN_LINK_RE.match(name))


def _digest(switch_name: str) -> str:
    return hashlib.sha256(f"parvisor-switch/{switch_name}".encode()).hexdigest()


def bridge_name(switch_name: str) -> str:
    """The switch's own bridge: ``pvbr-`` + 10 hex digits (15 characters)."""
    return "pvbr-" + _digest(switch_name)[:10]


def vlan_bridge_name(switch_name: str, vlan: int) -> str:
    """The bridge of one VLAN when bridge VLAN filtering is missing (<= 15 chars)."""
    return f"pvb{_digest(switch_name)[:7]}v{vlan}"


def vlan_bridge_prefix(switch_name: str) -> str:
    return f"pvb{_digest(switch_name)[:7]}v"


def vlan_uplink_name(switch_name: str, vlan: int) -> str:
    """The 802.1Q link on an external uplink for one VLAN (fallback path only)."""
    return f"pvu{_digest(switch_name)[:7]}v{vlan}"


def vlan_uplink_prefix(switch_name: str) -> str:
    return f"pvu{_digest(switch_name)[:7]}v"


def bridge_mac(switch_name: str) -> str:
    """A fixed MAC for the bridge, so the host's address on it never changes hardware
    address when ports come and go (a bridge otherwise takes its lowest port MAC).
    Prefix 06:70:76 is locally administered + unicast and disjoint from NIC MACs
    (``parvisor.switch.mac.MAC_PREFIX`` = 02:70:76)."""
    tail = _digest(switch_name)[10:16]
    return "06:70:76:" + ":".join(tail[i:i + 2] for i in range(0, 6, 2))


def nat_table_name(switch_name: str) -> str:
    return f"parvisor_{bridge_name(switch_name)}"


def _interface_cidr(value: str, what: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value!r} is not an IPv4 address with a prefix"
                         " length, e.g. 10.20.30.1/24") from exc
    if "/" not in value:
        raise ValueError(f"{what} {value!r} needs a prefix length, e.g. 10.20.30.1/24")
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"{what} {value!r} is the network or broadcast address")
    if iface.ip.is_multicast or iface.ip.is_loopback or iface.ip.is_unspecified:
        raise ValueError(f"{what} {value!r} is not a usable host address")
    return iface


def _nat_subnet(value: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"subnet {value!r} is not an IPv4 network such as"
                         f" 10.213.7.0/24 ({exc})") from exc
    if not NAT_MIN_PREFIX <= net.prefixlen <= NAT_MAX_PREFIX:
        raise ValueError(f"subnet {value!r}: the prefix length must be between"
                         f" /{NAT_MIN_PREFIX} and /{NAT_MAX_PREFIX}")
    if net.is_loopback or net.is_multicast or net.is_link_local:
        raise ValueError(f"subnet {value!r} is not usable for a NAT network")
    return net


class SwitchDefinition(BaseModel):
    """What a switch *is*. ``subnet`` of a NAT switch may be left out at creation:
    ``SwitchManager.create`` then picks a free one and stores it, so it stays stable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SWITCH_SCHEMA_VERSION
    name: str
    type: SwitchType
    uplink: str | None = None          # external: the host interface bridged in
    host_address: str | None = None    # internal: the host's CIDR on the switch
    subnet: str | None = None          # nat: the VM network; host takes its first address
    notes: str = Field(default="", max_length=1024)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_switch_name(value)

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, value: str | None) -> str | None:
        if value is not None and (not IFNAME_RE.match(value) or value in (".", "..")):
            raise ValueError(f"uplink {value!r} is not a valid interface name")
        return value

    @field_validator("host_address")
    @classmethod
    def _host_address(cls, value: str | None) -> str | None:
        return None if value is None else str(_interface_cidr(value, "host address"))

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        return None if value is None else str(_nat_subnet(value))

    @model_validator(mode="after")
    def _fields_fit_type(self) -> "SwitchDefinition":
        allowed = {"external": {"uplink"}, "internal": {"host_address"},
                   "private": set(), "nat": {"subnet"}}[self.type]
        for field in ("uplink", "host_address", "subnet"):
            if getattr(self, field) is not None and field not in allowed:
                raise ValueError(f"a {self.type} switch takes no {field.replace('_', '-')}")
        if self.type == "external" and self.uplink is None:
            raise ValueError("an external switch needs an uplink interface")
        return self

    # --- derived facts (pure) -----------------------------------------------------
    @property
    def bridge(self) -> str:
        return bridge_name(self.name)

    def gateway_cidr(self) -> str | None:
        """The host's address on the bridge: internal's host_address, NAT's first host."""
        if self.type == "internal":
            return self.host_address
        if self.type == "nat" and self.subnet:
            net = ipaddress.IPv4Network(self.subnet)
            return f"{net.network_address + 1}/{net.prefixlen}"
        return None

    def network(self) -> ipaddress.IPv4Network | None:
        cidr = self.gateway_cidr()
        return ipaddress.IPv4Interface(cidr).network if cidr else None


def upgrade_switch_document(data: dict[str, Any]) -> dict[str, Any]:
    """Lift a stored switch document to the current version (only version 1 exists)."""
    version = data.get("schema_version", 1)
    if version > SWITCH_SCHEMA_VERSION:
        raise ValueError(f"switch definition version {version} is newer than this parvisor")
    return data


def parse_switch_definition(data: dict[str, Any]) -> SwitchDefinition:
    """Build a definition from user input; pydantic's errors become one InvalidInput."""
    try:
        return validate_model(SwitchDefinition, upgrade_switch_document(dict(data)))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
