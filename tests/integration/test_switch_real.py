"""Virtual switches against the real kernel: bridges, taps, veth pairs, network
namespaces, nftables and dnsmasq. Needs root (the project's machines are root).

Every object gets a unique name prefix and is removed in ``finally`` blocks even when a
test fails; dnsmasq is stopped by the PID the switch layer recorded, never by name.
VM ports are imitated with veth pairs whose far ends live in namespaces, so the data
path (ping, DHCP, NAT) is exercised without QEMU.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from parvisor.errors import Busy, Failed
from parvisor.model.vm import NicSpec
from parvisor.store.sqlite import SqliteStore
from parvisor.switch.manager import NicUser, SwitchManager
from parvisor.switch.model import SwitchDefinition, nat_table_name
from parvisor.vm.argv import tap_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netlink")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def in_ns(ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          timeout=timeout)


def pings(ns: str, address: str) -> bool:
    # busybox's ping: no extra package; -w bounds the wait of a ping that must fail
    return in_ns(ns, "busybox", "ping", "-c", "2", "-A", "-W", "1", "-w", "2", address).returncode == 0


def link(name: str) -> dict | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        msg = ipr.link("get", index=found[0])[0]
        master = msg.get("IFLA_MASTER")
        return {"master": ipr.link("get", index=master)[0].get("IFLA_IFNAME") if master
                else None, "up": bool(msg["flags"] & 1),
                "addresses": [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                              for a in ipr.get_addr(index=found[0], family=2)]}


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


def alive(pid: int) -> bool:
    # dnsmasq daemonizes, so init is its parent; a zombie awaiting init counts as gone
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


class Lab:
    """Namespaces and veth pairs of one test, all under one random prefix."""

    def __init__(self) -> None:
        self.tag = "pvt" + secrets.token_hex(2)       # 't' is not hex: no tap clash
        self.namespaces: list[str] = []
        self.links: list[str] = []

    def netns(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    def veth(self, suffix: str, ns: str | None = None, cidr: str | None = None) -> str:
        """A veth pair: host end ``<tag><suffix>`` returned, far end ``eth0`` in ns."""
        host_end, far_end = f"{self.tag}{suffix}", f"{self.tag}{suffix}p"
        ip("link", "add", host_end, "type", "veth", "peer", "name", far_end)
        self.links.append(host_end)
        if ns is not None:
            ip("link", "set", far_end, "netns", ns)
            in_ns(ns, "ip", "link", "set", far_end, "name", "eth0")
            in_ns(ns, "ip", "link", "set", "eth0", "up")
            if cidr:
                in_ns(ns, "ip", "addr", "add", cidr, "dev", "eth0")
        return host_end

    def close(self) -> None:
        for name in self.links:
            ip("link", "del", name, check=False)
        for name in self.namespaces:
            ip("netns", "del", name, check=False)


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def switches(tmp_path):
    """A manager over a real store; every switch it still knows is deleted afterwards."""
    users: dict[str, list[NicUser]] = {}
    store = SqliteStore(tmp_path / "parvisor.db")
    manager = SwitchManager(store, tmp_path / "state", nic_users=lambda n: users.get(n, []))
    manager.test_users = users
    manager.test_prefix = "t" + secrets.token_hex(3)
    try:
        yield manager
    finally:
        users.clear()
        for defn in manager.definitions():
            try:
                manager.delete(defn.name)
            finally:
                with IPRoute() as ipr:         # belt and braces if delete failed
                    for index in ipr.link_lookup(ifname=defn.bridge):
                        ipr.link("del", index=index)
        manager.close()
        store.close()


def name(manager: SwitchManager, suffix: str) -> str:
    return f"{manager.test_prefix}-{suffix}"


# --- each type: created, visible to the kernel, removed ---------------------------------
def test_private_and_internal_switch_lifecycle(switches):
    private = switches.create(SwitchDefinition(name=name(switches, "priv"), type="private"))
    internal = switches.create(SwitchDefinition(name=name(switches, "int"), type="internal",
                                                host_address="198.51.100.1/24"))
    assert link(private.bridge)["up"] and link(private.bridge)["addresses"] == []
    assert link(internal.bridge)["addresses"] == ["198.51.100.1/24"]
    assert {s.definition.name for s in switches.list()} == {private.name, internal.name}
    for defn in (private, internal):
        switches.delete(defn.name)
        assert link(defn.bridge) is None
    assert switches.list() == []


def test_nat_switch_lifecycle(switches):
    defn = switches.create(SwitchDefinition(name=name(switches, "nat"), type="nat",
                                            subnet="10.213.251.0/24"))
    status = switches.status(defn.name)
    assert link(defn.bridge)["addresses"] == ["10.213.251.1/24"]
    assert nat_table_name(defn.name) in nft_tables()
    pid = status.dhcp_pid
    assert pid and alive(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"dnsmasq")
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    switches.delete(defn.name)
    assert link(defn.bridge) is None and nat_table_name(defn.name) not in nft_tables()
    assert not alive(pid)
    assert not (switches.state_dir / "switches" / defn.name).exists()


def test_switch_in_use_is_not_deleted(switches):
    defn = switches.create(SwitchDefinition(name=name(switches, "busy"), type="private"))
    switches.test_users[defn.name] = [NicUser("web1", "nic0")]
    with pytest.raises(Busy, match=f"switch '{defn.name}' is used by VM 'web1' NIC 'nic0'"):
        switches.delete(defn.name)
    assert link(defn.bridge) is not None


def test_tap_is_created_plugged_and_removed(switches):
    defn = switches.create(SwitchDefinition(name=name(switches, "tap"), type="private"))
    vm_uuid = "5b0d3a52-0000-4000-8000-" + secrets.token_hex(6)
    nic = NicSpec(id="nic0", switch=defn.name, mac="02:70:76:00:00:09")
    attachment = switches.attach_nic(vm_uuid, nic, owner_uid=65534)
    try:
        assert attachment.tap == tap_name(vm_uuid, "nic0")
        assert link(attachment.tap)["master"] == defn.bridge
        assert switches.attach_nic(vm_uuid, nic) == attachment       # idempotent
    finally:
        switches.detach_nic(vm_uuid, "nic0")
    assert link(attachment.tap) is None


# --- external: bridged onto a veth "uplink" whose far end is a namespace ----------------
def test_external_switch_bridges_vm_ports_onto_the_uplink(switches, lab):
    outside = lab.netns("out")
    vm = lab.netns("vm")
    uplink = lab.veth("u", outside, "192.0.2.1/24")
    defn = switches.create(SwitchDefinition(name=name(switches, "ext"), type="external",
                                            uplink=uplink))
    assert link(uplink)["master"] == defn.bridge
    port = lab.veth("v", vm, "192.0.2.2/24")
    switches.attach_port(defn.name, port, None)
    assert pings(vm, "192.0.2.1")
    if not switches.vlan_filtering:            # this CI kernel: no 802.1Q devices either
        tagged = lab.veth("t")
        try:
            switches.attach_port(defn.name, tagged, 10)
        except Failed as exc:
            assert "802.1Q" in exc.message
        else:
            pytest.fail("VLAN over an uplink without 802.1Q must fail")
        assert switches.status(defn.name).vlan_bridges == []     # nothing half-built
    switches.delete(defn.name)
    assert link(uplink) is not None and link(uplink)["master"] is None


# --- VLAN isolation, for real, on whichever path this kernel supports -------------------
def test_vlans_isolate_traffic(switches, lab):
    defn = switches.create(SwitchDefinition(name=name(switches, "vlan"), type="private"))
    members = {"a": (10, "10.77.0.1"), "b": (10, "10.77.0.2"), "c": (20, "10.77.0.3"),
               "d": (20, "10.77.0.4"), "e": (None, "10.77.0.5")}
    for key, (vlan, address) in members.items():
        ns = lab.netns(key)
        switches.attach_port(defn.name, lab.veth(key, ns, f"{address}/24"), vlan)
    ns = {key: f"{lab.tag}-{key}" for key in members}
    assert pings(ns["a"], "10.77.0.2"), "same VLAN 10 must pass"
    assert pings(ns["c"], "10.77.0.4"), "same VLAN 20 must pass"
    assert not pings(ns["a"], "10.77.0.3"), "VLAN 10 must not reach VLAN 20"
    assert not pings(ns["e"], "10.77.0.1"), "untagged must not reach VLAN 10"
    mode = switches.status(defn.name).vlan_mode
    assert mode == ("filtering" if switches.vlan_filtering else "bridge-per-vlan")
    for key in members:
        switches.detach_port(f"{lab.tag}{key}")
    assert switches.status(defn.name).vlan_bridges == []


# --- NAT: DHCP from dnsmasq, then out through the host with masquerading ---------------
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"""


def dhcp_in(ns: str, script: Path) -> str:
    result = in_ns(ns, "busybox", "udhcpc", "-i", "eth0", "-q", "-n", "-t", "8", "-T", "1",
                   "-s", str(script))
    assert result.returncode == 0, result.stderr + result.stdout
    return in_ns(ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout


def test_nat_switch_gives_leases_and_masquerades(switches, lab, tmp_path):
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    defn = switches.create(SwitchDefinition(name=name(switches, "nat"), type="nat",
                                            subnet="10.213.252.0/24"))
    client = lab.netns("cl")
    switches.attach_port(defn.name, lab.veth("c", client), None)
    # "the internet": a namespace that knows no route back to the NAT subnet, so only
    # masqueraded packets (source = the host's 198.18.252.1) get an answer
    wan = lab.netns("wan")
    wan_end = lab.veth("w", wan, "198.18.252.2/30")
    ip("addr", "add", "198.18.252.1/30", "dev", wan_end)
    ip("link", "set", wan_end, "up")
    shown = dhcp_in(client, script)
    assert "inet 10.213.252." in shown
    leases = (switches.state_dir / "switches" / defn.name / "dnsmasq.leases").read_text()
    assert "10.213.252." in leases
    assert pings(client, "10.213.252.1"), "the host is the gateway"
    assert pings(client, "198.18.252.2"), "out through the host, masqueraded"


def test_ensure_all_recreates_switches_after_they_vanish(switches):
    nat = switches.create(SwitchDefinition(name=name(switches, "re"), type="nat",
                                           subnet="10.213.253.0/24"))
    old_pid = switches.status(nat.name).dhcp_pid
    with IPRoute() as ipr:                      # what a reboot does to our bridge
        ipr.link("del", index=ipr.link_lookup(ifname=nat.bridge)[0])
    started = time.monotonic()
    assert switches.ensure_all() == {}
    assert time.monotonic() - started < 10
    assert link(nat.bridge)["addresses"] == ["10.213.253.1/24"]
    new_pid = switches.status(nat.name).dhcp_pid
    assert new_pid and new_pid != old_pid and not alive(old_pid)
    assert switches.ensure_all() == {}          # idempotent
    assert switches.status(nat.name).dhcp_pid == new_pid
