"""Virtual switches: the manager the CLI/API and the VM lifecycle call.

Two halves, kept apart on purpose:

* **pure planning** – ``plan_switch``, ``plan_port``, ``nat_plan``, ``choose_nat_subnet``,
  ``check_conflicts``: definitions in, plans out; no I/O.
* **effects** – ``SwitchManager`` applies plans through the ``Netlink`` adapter and the
  ``NatBackend``, and keeps definitions in the store.

VLANs. "No VLAN" and VLAN 1 are the same network (the untagged one, where the host's
address, DHCP and NAT live). Where the kernel has bridge VLAN filtering, a switch is one
bridge with ``vlan_filtering=1`` and each VM port gets its VLAN as native (pvid,
untagged); an external uplink carries the VLANs tagged. Where it has not, each VLAN
gets its own bridge ``pvb<hash>v<vid>`` (created on the first NIC, removed with the
last), so ports of different VLANs share no bridge; an external switch then bridges an
802.1Q link of the uplink into it (refused clearly when the kernel has no 802.1Q).
The choice is made at run time (``Netlink.vlan_filtering_supported``, cached).

This module must never run QEMU, kill processes, or decide which NICs a VM has: the
caller says which NICs use a switch (``nic_users``) and which MACs are taken.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Protocol

from pydantic import BaseModel

from parvisor.errors import AlreadyExists, Busy, Failed, InvalidInput, ParvisorError
from parvisor.model.vm import NicSpec
from parvisor.switch.model import (DEFAULT_VLAN, SwitchDefinition, bridge_mac, is_parvisor_link,
                                   nat_table_name, upgrade_switch_document, vlan_bridge_name,
                                   vlan_bridge_prefix, vlan_uplink_name, vlan_uplink_prefix)
from parvisor.switch.nat import NatBackend, NatPlan, dhcp_range
from parvisor.switch.netlink import Netlink
from parvisor.vm.argv import tap_name

NAT_POOL = ipaddress.IPv4Network("10.213.0.0/16")   # default NAT subnets: its /24s


class NicUser(NamedTuple):
    """One NIC that uses a switch (what ``nic_users`` returns)."""

    vm_name: str
    nic_id: str


class SwitchStore(Protocol):
    """The part of ``parvisor.store.sqlite.SqliteStore`` the switch layer uses."""

    def put_switch(self, name: str, document: dict, *, create: bool) -> None: ...
    def get_switch(self, name: str) -> dict: ...
    def list_switches(self) -> list[dict]: ...
    def delete_switch(self, name: str) -> None: ...


# --- plans (pure) --------------------------------------------------------------------------
@dataclass(frozen=True)
class BridgePlan:
    name: str
    mac: str | None
    vlan_filtering: bool
    uplink: str | None = None          # a port enslaved with the bridge (external)
    address: str | None = None         # the host's CIDR on the bridge


@dataclass(frozen=True)
class VlanLinkPlan:
    name: str
    parent: str
    vid: int


@dataclass(frozen=True)
class SwitchPlan:
    definition: SwitchDefinition
    bridge: BridgePlan
    nat: NatPlan | None


@dataclass(frozen=True)
class PortPlan:
    """How one port (a VM tap) joins a switch."""

    port: str
    bridge: str                        # the bridge the port is enslaved to
    vlan: int | None                   # the NIC's VLAN as given
    native_vid: int | None = None      # filtering path: the port's pvid (None: default 1)
    uplink_trunk: str | None = None    # filtering path: uplink that must carry the VLAN
    vlan_bridge: BridgePlan | None = None    # fallback path: the VLAN's own bridge
    vlan_uplink: VlanLinkPlan | None = None  # fallback path on an external switch


@dataclass(frozen=True)
class NicAttachment:
    """What ``attach_nic`` returns: the tap QEMU opens and where it is plugged."""

    tap: str
    bridge: str
    switch: str
    vlan: int | None


class SwitchStatus(BaseModel):
    """``list``/``get_status`` output (JSON-ready with ``model_dump``)."""

    definition: SwitchDefinition
    bridge: str
    bridge_present: bool
    vlan_mode: str                      # "filtering" | "bridge-per-vlan"
    vlan_bridges: list[str]
    dhcp_pid: int | None = None


def nat_plan(defn: SwitchDefinition, state_dir: Path) -> NatPlan | None:
    if defn.type != "nat":
        return None
    if defn.subnet is None:
        raise InvalidInput(f"NAT switch '{defn.name}' has no subnet")
    start, end = dhcp_range(defn.subnet)
    gateway = str(ipaddress.IPv4Interface(defn.gateway_cidr()).ip)
    return NatPlan(switch=defn.name, bridge=defn.bridge, table=nat_table_name(defn.name),
                   subnet=defn.subnet, gateway=gateway, dhcp_start=start, dhcp_end=end,
                   state_dir=state_dir / "switches" / defn.name)


def plan_switch(defn: SwitchDefinition, *, vlan_filtering: bool, state_dir: Path) -> SwitchPlan:
    bridge = BridgePlan(name=defn.bridge, mac=bridge_mac(defn.name),
                        vlan_filtering=vlan_filtering, uplink=defn.uplink,
                        address=defn.gateway_cidr())
    return SwitchPlan(defn, bridge, nat_plan(defn, state_dir))


def plan_port(defn: SwitchDefinition, port: str, vlan: int | None, *,
              vlan_filtering: bool) -> PortPlan:
    if vlan is None or vlan == DEFAULT_VLAN:
        return PortPlan(port=port, bridge=defn.bridge, vlan=vlan)
    if vlan_filtering:
        return PortPlan(port=port, bridge=defn.bridge, vlan=vlan, native_vid=vlan,
                        uplink_trunk=defn.uplink)
    vlan_bridge = BridgePlan(name=vlan_bridge_name(defn.name, vlan), mac=None,
                             vlan_filtering=False)
    uplink = None
    if defn.uplink is not None:
        uplink = VlanLinkPlan(vlan_uplink_name(defn.name, vlan), defn.uplink, vlan)
    return PortPlan(port=port, bridge=vlan_bridge.name, vlan=vlan,
                    vlan_bridge=vlan_bridge, vlan_uplink=uplink)


def choose_nat_subnet(name: str, taken: Iterable[ipaddress.IPv4Network]) -> str:
    """A /24 of ``NAT_POOL`` not overlapping ``taken``; the start depends on the name so
    two hosts usually pick the same subnet for the same switch."""
    taken = list(taken)
    subnets = list(NAT_POOL.subnets(new_prefix=24))
    start = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(subnets)
    for step in range(len(subnets)):
        candidate = subnets[(start + step) % len(subnets)]
        if not any(candidate.overlaps(net) for net in taken):
            return str(candidate)
    raise InvalidInput(f"no free /24 left in {NAT_POOL} for NAT switch '{name}';"
                       " give one with --subnet")


def check_conflicts(defn: SwitchDefinition, others: Iterable[SwitchDefinition],
                    host_networks: dict[str, list[str]]) -> None:
    """Refuse a definition clashing with other switches or the host's networks."""
    for other in others:
        if other.name == defn.name:
            continue
        if other.bridge == defn.bridge:
            raise AlreadyExists(f"switch '{defn.name}' would share bridge {defn.bridge}"
                                f" with switch '{other.name}'; choose another name")
        if defn.uplink and defn.uplink == other.uplink:
            raise Busy(f"uplink {defn.uplink} is already used by switch '{other.name}'",
                       uplink=defn.uplink)
        mine, theirs = defn.network(), other.network()
        if mine and theirs and mine.overlaps(theirs):
            raise InvalidInput(f"network {mine} of switch '{defn.name}' overlaps {theirs}"
                               f" of switch '{other.name}'")
    mine = defn.network()
    for ifname, networks in sorted(host_networks.items()):
        if ifname == defn.bridge or mine is None:
            continue
        for net in networks:
            if mine.overlaps(ipaddress.IPv4Network(net)):
                raise InvalidInput(f"network {mine} of switch '{defn.name}' overlaps"
                                   f" {net} on host interface {ifname}")


def describe_users(switch: str, users: list[NicUser]) -> str:
    shown = ", ".join(f"VM '{u.vm_name}' NIC '{u.nic_id}'" for u in users[:5])
    more = f" and {len(users) - 5} more" if len(users) > 5 else ""
    return f"switch '{switch}' is used by {shown}{more}"


# --- effects ---------------------------------------------------------------------------------
class SwitchManager:
    """Creates, lists, deletes and re-creates switches; plugs VM taps into them.

    ``nic_users(switch_name)`` lists the NICs (of any VM, running or not) that name the
    switch; ``delete`` refuses while it returns any. All public methods serialize on one
    lock, so the manager may be shared by the service's worker threads.
    """

    def __init__(self, store: SwitchStore, state_dir: Path, *,
                 netlink: Netlink | None = None, nat: NatBackend | None = None,
                 nic_users: Callable[[str], Iterable[NicUser]] | None = None) -> None:
        self.store = store
        self.state_dir = Path(state_dir)
        self._netlink = netlink
        self._nat = nat
        self._nic_users = nic_users or (lambda _name: ())
        self._lock = threading.RLock()

    # adapters are built on first use so that read-only callers need no root
    @property
    def netlink(self) -> Netlink:
        if self._netlink is None:
            from parvisor.switch.netlink import PyrouteNetlink
            self._netlink = PyrouteNetlink()
        return self._netlink

    @property
    def nat(self) -> NatBackend:
        if self._nat is None:
            from parvisor.switch.nat import NatService
            self._nat = NatService()
        return self._nat

    @property
    def vlan_filtering(self) -> bool:
        return self.netlink.vlan_filtering_supported()

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()

    # --- reading ------------------------------------------------------------------------
    def get(self, name: str) -> SwitchDefinition:
        return SwitchDefinition.model_validate(upgrade_switch_document(self.store.get_switch(name)))

    def definitions(self) -> list[SwitchDefinition]:
        return [SwitchDefinition.model_validate(upgrade_switch_document(doc))
                for doc in self.store.list_switches()]

    def status(self, name: str) -> SwitchStatus:
        return self._status(self.get(name))

    def list(self) -> list[SwitchStatus]:
        with self._lock:
            return [self._status(defn) for defn in self.definitions()]

    def _status(self, defn: SwitchDefinition) -> SwitchStatus:
        plan = nat_plan(defn, self.state_dir)
        return SwitchStatus(
            definition=defn, bridge=defn.bridge,
            bridge_present=self.netlink.link(defn.bridge) is not None,
            vlan_mode="filtering" if self.vlan_filtering else "bridge-per-vlan",
            vlan_bridges=self.netlink.links_with_prefix(vlan_bridge_prefix(defn.name)),
            dhcp_pid=self.nat.dhcp_pid(plan) if plan else None)

    # --- create / delete ----------------------------------------------------------------
    def create(self, defn: SwitchDefinition) -> SwitchDefinition:
        """Check (nothing changes on refusal), build the switch, then store it. A NAT
        switch without subnet gets a free /24; the returned definition has it."""
        with self._lock:
            others = self.definitions()
            if any(other.name == defn.name for other in others):
                raise AlreadyExists(f"a switch named '{defn.name}' already exists",
                                    name=defn.name)
            host_networks = self.netlink.host_networks()
            defn = self._with_default_subnet(defn, others, host_networks)
            check_conflicts(defn, others, host_networks)
            if defn.uplink is not None:
                self._check_uplink(defn.uplink)
            try:
                self._apply_switch(defn)
            except BaseException:
                self._teardown_quietly(defn)     # leave nothing half-built behind
                raise
            self.store.put_switch(defn.name, defn.model_dump(mode="json"), create=True)
            return defn

    def _with_default_subnet(self, defn: SwitchDefinition, others: list[SwitchDefinition],
                             host_networks: dict[str, list[str]]) -> SwitchDefinition:
        if defn.type != "nat" or defn.subnet is not None:
            return defn
        taken = [net for net in (o.network() for o in others) if net is not None]
        taken += [ipaddress.IPv4Network(n) for nets in host_networks.values() for n in nets]
        subnet = choose_nat_subnet(defn.name, taken)
        return SwitchDefinition.model_validate({**defn.model_dump(), "subnet": subnet})

    def _check_uplink(self, uplink: str) -> None:
        link = self.netlink.link(uplink)
        if link is None:
            raise InvalidInput(f"uplink {uplink} does not exist on this host", uplink=uplink)
        if uplink == "lo" or link.kind in ("bridge", "tun") or is_parvisor_link(uplink):
            what = "parvisor" if is_parvisor_link(uplink) else link.kind or "loopback"
            raise InvalidInput(f"uplink {uplink} is a {what} interface; an external switch"
                               " needs a host network interface", uplink=uplink)
        if link.master is not None:
            raise Busy(f"uplink {uplink} is already a port of bridge {link.master}",
                       uplink=uplink)
        # Enslaving an interface strips it of its role as the host's IP interface:
        # refuse rather than cut the host off that network.
        routable = [a for a in self.netlink.addresses(uplink)
                    if not ipaddress.ip_interface(a).is_link_local]
        if routable:
            raise InvalidInput(f"uplink {uplink} has addresses ({', '.join(routable)});"
                               " bridging it would cut the host off that network;"
                               " move them off it first", uplink=uplink)

    def delete(self, name: str) -> None:
        """Refuse while any NIC uses the switch; otherwise tear it down, then forget it."""
        with self._lock:
            defn = self.get(name)
            users = [NicUser(*user) for user in self._nic_users(name)]
            if users:
                raise Busy(describe_users(name, users), switch=name,
                           users=[u._asdict() for u in users])
            self._teardown(defn)
            self.store.delete_switch(name)

    def _teardown_quietly(self, defn: SwitchDefinition) -> None:
        try:
            self._teardown(defn)
        except ParvisorError:
            pass     # the original error is the one worth reporting

    def _teardown(self, defn: SwitchDefinition) -> None:
        plan = nat_plan(defn, self.state_dir) if defn.subnet else None
        if plan is not None:
            self.nat.remove(plan)
        for prefix in (vlan_bridge_prefix(defn.name), vlan_uplink_prefix(defn.name)):
            for link in self.netlink.links_with_prefix(prefix):
                self.netlink.delete_link(link)
        self.netlink.delete_link(defn.bridge)    # the kernel frees the uplink port
        shutil.rmtree(self.state_dir / "switches" / defn.name, ignore_errors=True)

    # --- (re-)creating ------------------------------------------------------------------
    def ensure_switch(self, defn: SwitchDefinition) -> None:
        """Make the kernel match the definition; harmless when it already does."""
        with self._lock:
            self._apply_switch(defn)

    def ensure_all(self, nics: Iterable[tuple[str, NicSpec]] = ()) -> dict[str, str]:
        """After a reboot or restart: re-create every stored switch, then re-plug the
        given ``(vm_uuid, nic)`` pairs (NICs of VMs that are running). Carries on past
        failures; returns ``{switch name or "vm_uuid/nic_id": error message}``."""
        errors: dict[str, str] = {}
        with self._lock:
            for defn in self.definitions():
                try:
                    self._apply_switch(defn)
                except ParvisorError as exc:
                    errors[defn.name] = exc.message
            for vm_uuid, nic in nics:
                try:
                    self.attach_nic(vm_uuid, nic)
                except ParvisorError as exc:
                    errors[f"{vm_uuid}/{nic.id}"] = exc.message
        return errors

    def _apply_switch(self, defn: SwitchDefinition) -> None:
        plan = plan_switch(defn, vlan_filtering=self.vlan_filtering, state_dir=self.state_dir)
        bridge, nl = plan.bridge, self.netlink
        created = nl.ensure_bridge(bridge.name, mac=bridge.mac,
                                   vlan_filtering=bridge.vlan_filtering)
        if bridge.uplink is not None:
            link = nl.link(bridge.uplink)
            if link is None:
                raise Failed(f"uplink {bridge.uplink} of switch '{defn.name}' is missing",
                             switch=defn.name, uplink=bridge.uplink)
            if link.master != bridge.name:
                nl.set_master(bridge.uplink, bridge.name)
            nl.set_up(bridge.uplink)
        if bridge.address is not None:
            nl.add_address(bridge.name, bridge.address)
        nl.set_up(bridge.name)
        if plan.nat is not None:
            # dnsmasq bound to a bridge that was re-created must bind again
            self.nat.ensure(plan.nat, restart_dhcp=created)

    # --- ports --------------------------------------------------------------------------
    def attach_nic(self, vm_uuid: str, nic: NicSpec, *,
                   owner_uid: int | None = None) -> NicAttachment:
        """Before QEMU starts (or hot-plugs) a NIC: create its tap (``tap_name``) and plug
        it into the NIC's switch and VLAN. Idempotent. ``owner_uid`` lets an unprivileged
        QEMU open the tap."""
        with self._lock:
            self.get(nic.switch)     # NotFound before anything is created
            tap = tap_name(vm_uuid, nic.id)
            created = self.netlink.ensure_tap(tap, owner_uid=owner_uid)
            try:
                return self.attach_port(nic.switch, tap, nic.vlan)
            except BaseException:
                if created:
                    self.netlink.delete_link(tap)
                raise

    def attach_port(self, switch: str, port: str, vlan: int | None) -> NicAttachment:
        """Plug an existing interface (a tap, or a veth end in tests) into a switch."""
        with self._lock:
            defn = self.get(switch)
            nl = self.netlink
            plan = plan_port(defn, port, vlan, vlan_filtering=self.vlan_filtering)
            if nl.link(defn.bridge) is None:
                self._apply_switch(defn)
            try:
                self._plug(plan)
            except BaseException:
                if plan.vlan_bridge is not None:     # do not leave an empty VLAN bridge
                    self._drop_vlan_bridge_if_unused(plan.vlan_bridge.name)
                raise
            return NicAttachment(tap=port, bridge=plan.bridge, switch=switch, vlan=vlan)

    def _plug(self, plan: PortPlan) -> None:
        nl = self.netlink
        if plan.vlan_bridge is not None:
            self._ensure_vlan_bridge(plan)
        nl.set_master(plan.port, plan.bridge)
        if plan.native_vid is not None:
            nl.set_port_vlan(plan.port, plan.native_vid, native=True)
        if plan.uplink_trunk is not None and plan.native_vid is not None:
            nl.set_port_vlan(plan.uplink_trunk, plan.native_vid, native=False)
        nl.set_up(plan.port)     # only now, so no frame leaks into the wrong VLAN

    def _ensure_vlan_bridge(self, plan: PortPlan) -> None:
        nl, bridge = self.netlink, plan.vlan_bridge
        assert bridge is not None
        nl.ensure_bridge(bridge.name, mac=bridge.mac, vlan_filtering=False)
        if plan.vlan_uplink is not None:
            uplink = plan.vlan_uplink
            nl.ensure_vlan_link(uplink.name, parent=uplink.parent, vid=uplink.vid)
            nl.set_master(uplink.name, bridge.name)
            nl.set_up(uplink.name)
        nl.set_up(bridge.name)

    def detach_nic(self, vm_uuid: str, nic_id: str) -> None:
        """After QEMU exited (or a NIC was hot-unplugged): remove the NIC's tap."""
        self.detach_port(tap_name(vm_uuid, nic_id))

    def detach_port(self, port: str) -> None:
        """Remove the interface and a per-VLAN bridge it leaves empty. Idempotent."""
        with self._lock:
            link = self.netlink.link(port)
            if link is None:
                return
            self.netlink.delete_link(port)
            if link.master is not None and _is_vlan_bridge(link.master):
                self._drop_vlan_bridge_if_unused(link.master)

    def _drop_vlan_bridge_if_unused(self, bridge: str) -> None:
        ports = self.netlink.bridge_ports(bridge)
        if any(not p.startswith("pvu") for p in ports):
            return                          # another VM port still uses this VLAN
        for uplink_link in ports:
            self.netlink.delete_link(uplink_link)
        self.netlink.delete_link(bridge)


def _is_vlan_bridge(name: str) -> bool:
    # pvb<7 hex>v<vid>; the switch bridge is pvbr-..., taps are pv<hex>
    return name.startswith("pvb") and not name.startswith("pvbr-") and is_parvisor_link(name)
