"""The narrow netlink adapter of the switch layer: bridges, taps, ports, addresses.

``Netlink`` is the interface the manager talks to; ``PyrouteNetlink`` implements it
with pyroute2 (this is the ONLY module importing pyroute2), and ``RecordingNetlink`` is
an in-memory fake that records every request, used by unit tests to check both VLAN
paths at the netlink-request level (and usable by other layers' tests: no root needed).

Every method is idempotent: "ensure" creates what is missing and leaves what exists,
deleting a missing link is not an error. Netlink errors become ``Failed`` with the
operation, the interface and the kernel's reason.

This module must never decide anything (which bridge, which VLAN): it only executes.
It must never shell out to ``ip``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import threading
from dataclasses import dataclass, field
from typing import Protocol

from parvisor.errors import Failed

_vlan_filtering_cache: bool | None = None
_vlan_filtering_lock = threading.Lock()


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    kind: str | None          # "bridge", "tun", "veth", "vlan", ... (None: physical)
    master: str | None        # the bridge it is a port of
    up: bool
    mac: str | None = None


class Netlink(Protocol):
    def link(self, name: str) -> LinkInfo | None: ...
    def links_with_prefix(self, prefix: str) -> list[str]: ...
    def bridge_ports(self, bridge: str) -> list[str]: ...
    def ensure_bridge(self, name: str, *, mac: str | None, vlan_filtering: bool) -> bool: ...
    def ensure_tap(self, name: str, *, owner_uid: int | None = None) -> bool: ...
    def ensure_vlan_link(self, name: str, *, parent: str, vid: int) -> bool: ...
    def delete_link(self, name: str) -> None: ...
    def set_master(self, name: str, bridge: str) -> None: ...
    def set_up(self, name: str) -> None: ...
    def add_address(self, name: str, cidr: str) -> None: ...
    def addresses(self, name: str) -> list[str]: ...
    def host_networks(self) -> dict[str, list[str]]: ...
    def set_port_vlan(self, port: str, vid: int, *, native: bool) -> None: ...
    def vlan_filtering_supported(self) -> bool: ...
    def close(self) -> None: ...


def _failed(action: str, name: str, exc: Exception) -> Failed:
    code = getattr(exc, "code", None)
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    return Failed(f"netlink: cannot {action} {name}: {reason}", interface=name,
                  action=action, errno=code)


def _refuse_event_loop_thread() -> None:
    # pyroute2 >= 0.9 drives its socket with its own asyncio loop: on a thread that
    # already runs a loop it fails obscurely ("This event loop is already running").
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise Failed("the switch layer does blocking netlink I/O: call it from a worker"
                 " thread (asyncio.to_thread), not from the event loop")


class PyrouteNetlink:
    """The real adapter. One rtnetlink socket; callers serialize (the manager locks).
    Must be used from threads without a running asyncio loop (see above)."""

    def __init__(self) -> None:
        _refuse_event_loop_thread()
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        self._NetlinkError = NetlinkError
        self._socket = IPRoute()

    @property
    def _ipr(self):
        _refuse_event_loop_thread()
        return self._socket

    def close(self) -> None:
        self._socket.close()

    # --- reading ----------------------------------------------------------------------
    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def _require(self, name: str) -> int:
        index = self._index(name)
        if index is None:
            raise Failed(f"netlink: interface {name} does not exist", interface=name)
        return index

    def _name_of(self, index: int | None) -> str | None:
        if not index:
            return None
        msgs = self._ipr.link("get", index=index)
        return msgs[0].get("IFLA_IFNAME") if msgs else None

    def link(self, name: str) -> LinkInfo | None:
        index = self._index(name)
        if index is None:
            return None
        msg = self._ipr.link("get", index=index)[0]
        info = msg.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info else None
        return LinkInfo(name=name, index=index, kind=kind,
                        master=self._name_of(msg.get("IFLA_MASTER")),
                        up=bool(msg["flags"] & 1), mac=msg.get("IFLA_ADDRESS"))

    def links_with_prefix(self, prefix: str) -> list[str]:
        names = [m.get("IFLA_IFNAME") for m in self._ipr.get_links()]
        return sorted(n for n in names if n and n.startswith(prefix))

    def bridge_ports(self, bridge: str) -> list[str]:
        index = self._index(bridge)
        if index is None:
            return []
        return sorted(m.get("IFLA_IFNAME") for m in self._ipr.get_links()
                      if m.get("IFLA_MASTER") == index)

    def addresses(self, name: str) -> list[str]:
        index = self._index(name)
        if index is None:
            return []
        return [f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}"
                for m in self._ipr.get_addr(index=index)]

    def host_networks(self) -> dict[str, list[str]]:
        """IPv4 networks configured on the host, by interface name."""
        names = {m["index"]: m.get("IFLA_IFNAME") for m in self._ipr.get_links()}
        result: dict[str, list[str]] = {}
        for msg in self._ipr.get_addr(family=2):
            cidr = f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}"
            net = str(ipaddress.IPv4Interface(cidr).network)
            result.setdefault(names.get(msg["index"], "?"), []).append(net)
        return result

    # --- changing ---------------------------------------------------------------------
    def ensure_bridge(self, name: str, *, mac: str | None, vlan_filtering: bool) -> bool:
        """Create the bridge if missing; returns True when it was created."""
        existing = self.link(name)
        if existing is not None and existing.kind != "bridge":
            raise Failed(f"netlink: {name} exists but is a {existing.kind}, not a bridge",
                         interface=name)
        extra = {"br_vlan_filtering": 1} if vlan_filtering else {}
        try:
            if existing is None:
                self._ipr.link("add", ifname=name, kind="bridge", **extra)
            elif vlan_filtering:
                self._ipr.link("set", index=existing.index, kind="bridge", **extra)
            if mac:
                self._ipr.link("set", index=self._require(name), address=mac)
        except self._NetlinkError as exc:
            raise _failed("create bridge", name, exc) from exc
        return existing is None

    def ensure_tap(self, name: str, *, owner_uid: int | None = None) -> bool:
        """A persistent tap (no packet-info header, as QEMU expects); True if created."""
        existing = self.link(name)
        if existing is not None:
            if existing.kind != "tun":
                raise Failed(f"netlink: {name} exists but is a {existing.kind}, not a tap",
                             interface=name)
            return False
        extra = {"uid": owner_uid} if owner_uid is not None else {}
        try:
            self._ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                           ifr={"no_pi": 1}, **extra)
        except (self._NetlinkError, OSError) as exc:
            raise _failed("create tap", name, exc) from exc
        return True

    def ensure_vlan_link(self, name: str, *, parent: str, vid: int) -> bool:
        if self.link(name) is not None:
            return False
        try:
            self._ipr.link("add", ifname=name, kind="vlan", link=self._require(parent),
                           vlan_id=vid)
        except self._NetlinkError as exc:
            if exc.code in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise Failed(f"cannot carry VLAN {vid} over uplink {parent}: this kernel"
                             " has neither bridge VLAN filtering nor 802.1Q VLAN devices",
                             interface=parent, vlan=vid) from exc
            raise _failed("create VLAN link", name, exc) from exc
        return True

    def delete_link(self, name: str) -> None:
        index = self._index(name)
        if index is None:
            return
        try:
            self._ipr.link("del", index=index)
        except self._NetlinkError as exc:
            if exc.code != errno.ENODEV:     # vanished meanwhile: that is what we wanted
                raise _failed("delete", name, exc) from exc

    def set_master(self, name: str, bridge: str) -> None:
        try:
            self._ipr.link("set", index=self._require(name), master=self._require(bridge))
        except self._NetlinkError as exc:
            raise _failed(f"attach to {bridge}:", name, exc) from exc

    def set_up(self, name: str) -> None:
        try:
            self._ipr.link("set", index=self._require(name), state="up")
        except self._NetlinkError as exc:
            raise _failed("bring up", name, exc) from exc

    def add_address(self, name: str, cidr: str) -> None:
        if cidr in self.addresses(name):
            return
        iface = ipaddress.IPv4Interface(cidr)
        try:
            self._ipr.addr("add", index=self._require(name), address=str(iface.ip),
                           prefixlen=iface.network.prefixlen)
        except self._NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _failed(f"add address {cidr} to", name, exc) from exc

    def set_port_vlan(self, port: str, vid: int, *, native: bool) -> None:
        """native: the port's only untagged VLAN (pvid), replacing the default VLAN 1;
        otherwise add ``vid`` as a tagged VLAN (an uplink trunk)."""
        index = self._require(port)
        try:
            if native:
                self._ipr.vlan_filter("add", index=index, vlan_info={"vid": vid, "pvid": True})
                if vid != 1:
                    self._ipr.vlan_filter("del", index=index, vlan_info={"vid": 1})
            else:
                self._ipr.vlan_filter("add", index=index, vlan_info={"vid": vid})
        except self._NetlinkError as exc:
            raise _failed(f"set VLAN {vid} on", port, exc) from exc

    def vlan_filtering_supported(self) -> bool:
        """Try VLAN filtering on a scratch bridge once per process; cache the answer."""
        global _vlan_filtering_cache
        with _vlan_filtering_lock:
            if _vlan_filtering_cache is None:
                _vlan_filtering_cache = self._probe_vlan_filtering()
            return _vlan_filtering_cache

    def _probe_vlan_filtering(self) -> bool:
        scratch = f"pvs{os.getpid()}"[:15]    # 's' is not hex: never a tap name
        try:
            self._ipr.link("add", ifname=scratch, kind="bridge")
            self._ipr.link("set", index=self._require(scratch), kind="bridge",
                           br_vlan_filtering=1)
            msg = self._ipr.link("get", index=self._require(scratch))[0]
            data = msg.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
            return bool(data.get("IFLA_BR_VLAN_FILTERING"))
        except self._NetlinkError:
            return False
        finally:
            self.delete_link(scratch)


# --- the recording fake ------------------------------------------------------------------
@dataclass
class _FakeLink:
    kind: str | None
    master: str | None = None
    up: bool = False
    mac: str | None = None
    addresses: list[str] = field(default_factory=list)
    vlans: dict[int, str] = field(default_factory=dict)   # vid -> "native" | "tagged"
    vlan_filtering: bool = False


class RecordingNetlink:
    """In-memory ``Netlink``: keeps links, records each *changing* request in ``calls``
    as ``(method, name, {arguments})``. ``vlan_filtering`` picks the kernel to imitate."""

    def __init__(self, *, vlan_filtering: bool = True, vlan_devices: bool = True) -> None:
        self.supports_vlan_filtering = vlan_filtering
        self.supports_vlan_devices = vlan_devices
        self.links: dict[str, _FakeLink] = {}
        self.calls: list[tuple[str, str, dict]] = []

    def _record(self, method: str, name: str, **kwargs: object) -> None:
        self.calls.append((method, name, kwargs))

    def add_physical(self, name: str, *addresses: str) -> None:
        self.links[name] = _FakeLink(kind=None, addresses=list(addresses))

    def close(self) -> None:
        pass

    def link(self, name: str) -> LinkInfo | None:
        fake = self.links.get(name)
        if fake is None:
            return None
        index = list(self.links).index(name) + 1
        return LinkInfo(name, index, fake.kind, fake.master, fake.up, fake.mac)

    def links_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.links if n.startswith(prefix))

    def bridge_ports(self, bridge: str) -> list[str]:
        return sorted(n for n, link in self.links.items() if link.master == bridge)

    def addresses(self, name: str) -> list[str]:
        return list(self.links[name].addresses) if name in self.links else []

    def host_networks(self) -> dict[str, list[str]]:
        return {name: [str(ipaddress.IPv4Interface(a).network) for a in link.addresses]
                for name, link in self.links.items() if link.addresses}

    def _require(self, name: str) -> _FakeLink:
        if name not in self.links:
            raise Failed(f"netlink: interface {name} does not exist", interface=name)
        return self.links[name]

    def ensure_bridge(self, name: str, *, mac: str | None, vlan_filtering: bool) -> bool:
        if vlan_filtering and not self.supports_vlan_filtering:
            raise Failed(f"netlink: cannot create bridge {name}: Operation not supported")
        self._record("ensure_bridge", name, mac=mac, vlan_filtering=vlan_filtering)
        created = name not in self.links
        link = self.links.setdefault(name, _FakeLink(kind="bridge"))
        link.mac, link.vlan_filtering = mac, vlan_filtering
        return created

    def ensure_tap(self, name: str, *, owner_uid: int | None = None) -> bool:
        self._record("ensure_tap", name, owner_uid=owner_uid)
        created = name not in self.links
        self.links.setdefault(name, _FakeLink(kind="tun"))
        return created

    def ensure_vlan_link(self, name: str, *, parent: str, vid: int) -> bool:
        self._require(parent)
        if not self.supports_vlan_devices:
            raise Failed(f"cannot carry VLAN {vid} over uplink {parent}: this kernel"
                         " has neither bridge VLAN filtering nor 802.1Q VLAN devices")
        self._record("ensure_vlan_link", name, parent=parent, vid=vid)
        created = name not in self.links
        self.links.setdefault(name, _FakeLink(kind="vlan"))
        return created

    def delete_link(self, name: str) -> None:
        self._record("delete_link", name)
        if self.links.pop(name, None) is None:
            return
        for link in self.links.values():      # the kernel frees a bridge's ports
            if link.master == name:
                link.master = None
                link.vlans.clear()

    def set_master(self, name: str, bridge: str) -> None:
        self._require(bridge)
        self._record("set_master", name, bridge=bridge)
        link = self._require(name)
        link.master, link.vlans = bridge, ({1: "native"} if self.links[bridge].vlan_filtering
                                           else {})

    def set_up(self, name: str) -> None:
        self._record("set_up", name)
        self._require(name).up = True

    def add_address(self, name: str, cidr: str) -> None:
        self._record("add_address", name, cidr=cidr)
        link = self._require(name)
        if cidr not in link.addresses:
            link.addresses.append(cidr)

    def set_port_vlan(self, port: str, vid: int, *, native: bool) -> None:
        link = self._require(port)
        if link.master is None or not self.links[link.master].vlan_filtering:
            raise Failed(f"netlink: cannot set VLAN {vid} on {port}: Operation not supported")
        self._record("set_port_vlan", port, vid=vid, native=native)
        if native:
            link.vlans = {vid: "native"}
        else:
            link.vlans[vid] = "tagged"

    def vlan_filtering_supported(self) -> bool:
        return self.supports_vlan_filtering
