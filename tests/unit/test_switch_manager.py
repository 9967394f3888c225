"""SwitchManager at the netlink-request level: both VLAN paths, refusals, re-creation.

Uses ``RecordingNetlink`` (imitating a kernel with or without bridge VLAN filtering) and
``FakeNat``; no root, no kernel objects."""

from pathlib import Path

import pytest

from parvisor.errors import AlreadyExists, Busy, Failed, InvalidInput, NotFound
from parvisor.model.vm import NicSpec
from parvisor.switch.manager import (NicUser, SwitchManager, choose_nat_subnet, plan_port,
                                     plan_switch)
from parvisor.switch.model import (SwitchDefinition, bridge_name, vlan_bridge_name,
                                   vlan_uplink_name)
from parvisor.switch.nat import FakeNat
from parvisor.switch.netlink import RecordingNetlink
from parvisor.vm.argv import tap_name

VM = "3f1c2f6e-8b0a-4c1e-9d57-0a4f1b2c3d4e"


class MemoryStore:
    def __init__(self):
        self.docs: dict[str, dict] = {}

    def put_switch(self, name, document, *, create):
        if create and name in self.docs:
            raise AlreadyExists(f"a switch named '{name}' already exists")
        self.docs[name] = dict(document)

    def get_switch(self, name):
        if name not in self.docs:
            raise NotFound(f"no switch named '{name}'")
        return dict(self.docs[name])

    def list_switches(self):
        return [dict(self.docs[n]) for n in sorted(self.docs)]

    def delete_switch(self, name):
        if self.docs.pop(name, None) is None:
            raise NotFound(f"no switch named '{name}'")


def make(tmp_path: Path, *, filtering: bool, vlan_devices: bool = True, users=None):
    netlink = RecordingNetlink(vlan_filtering=filtering, vlan_devices=vlan_devices)
    netlink.add_physical("eth0")
    netlink.add_physical("eth1", "192.168.1.10/24")
    nat = FakeNat()
    manager = SwitchManager(MemoryStore(), tmp_path, netlink=netlink, nat=nat,
                            nic_users=users or (lambda name: ()))
    return manager, netlink, nat


def nic(nic_id, switch, vlan=None):
    return NicSpec(id=nic_id, switch=switch, mac="02:70:76:00:00:01", vlan=vlan)


def calls_for(netlink, name):
    return [(method, kwargs) for method, who, kwargs in netlink.calls if who == name]


# --- pure planning -------------------------------------------------------------------------
def test_plan_port_filtering_path():
    defn = SwitchDefinition(name="lan", type="external", uplink="eth0")
    plan = plan_port(defn, "tapx", 10, vlan_filtering=True)
    assert (plan.bridge, plan.native_vid, plan.uplink_trunk) == (bridge_name("lan"), 10, "eth0")
    assert plan.vlan_bridge is None
    untagged = plan_port(defn, "tapx", None, vlan_filtering=True)
    assert untagged.native_vid is None and untagged.bridge == bridge_name("lan")
    assert plan_port(defn, "tapx", 1, vlan_filtering=True) == plan_port(
        defn, "tapx", 1, vlan_filtering=False)        # VLAN 1 is the untagged network


def test_plan_port_bridge_per_vlan_path():
    defn = SwitchDefinition(name="lan", type="external", uplink="eth0")
    plan = plan_port(defn, "tapx", 20, vlan_filtering=False)
    assert plan.bridge == vlan_bridge_name("lan", 20) and plan.native_vid is None
    assert plan.vlan_uplink.name == vlan_uplink_name("lan", 20)
    assert (plan.vlan_uplink.parent, plan.vlan_uplink.vid) == ("eth0", 20)
    private = SwitchDefinition(name="p", type="private")
    assert plan_port(private, "t", 20, vlan_filtering=False).vlan_uplink is None


def test_plan_switch_nat(tmp_path):
    defn = SwitchDefinition(name="n", type="nat", subnet="10.213.9.0/24")
    plan = plan_switch(defn, vlan_filtering=False, state_dir=tmp_path)
    assert plan.bridge.address == "10.213.9.1/24"
    assert (plan.nat.gateway, plan.nat.dhcp_start, plan.nat.dhcp_end) == (
        "10.213.9.1", "10.213.9.2", "10.213.9.254")
    assert plan.nat.pid_file == tmp_path / "switches" / "n" / "dnsmasq.pid"


def test_choose_nat_subnet_skips_taken():
    import ipaddress
    first = choose_nat_subnet("n", [])
    second = choose_nat_subnet("n", [ipaddress.IPv4Network(first)])
    assert first != second and second.endswith("/24")
    assert choose_nat_subnet("n", []) == first


# --- VLAN filtering path ---------------------------------------------------------------
def test_filtering_path_sets_pvid_before_up_and_trunks_uplink(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=True)
    manager.create(SwitchDefinition(name="lan", type="external", uplink="eth0"))
    br = bridge_name("lan")
    assert calls_for(netlink, br)[0] == ("ensure_bridge",
                                         {"mac": netlink.links[br].mac, "vlan_filtering": True})
    assert netlink.links["eth0"].master == br
    netlink.calls.clear()
    att = manager.attach_nic(VM, nic("nic0", "lan", vlan=10))
    tap = tap_name(VM, "nic0")
    assert (att.tap, att.bridge) == (tap, br)
    assert calls_for(netlink, tap) == [
        ("ensure_tap", {"owner_uid": None}), ("set_master", {"bridge": br}),
        ("set_port_vlan", {"vid": 10, "native": True}), ("set_up", {})]
    assert ("set_port_vlan", {"vid": 10, "native": False}) in calls_for(netlink, "eth0")
    assert netlink.links[tap].vlans == {10: "native"}
    assert not netlink.links_with_prefix(vlan_bridge_name("lan", 10)[:-2])


def test_filtering_path_untagged_nic_stays_in_default_vlan(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=True)
    manager.create(SwitchDefinition(name="p", type="private"))
    manager.attach_nic(VM, nic("nic0", "p"))
    tap = tap_name(VM, "nic0")
    assert netlink.links[tap].vlans == {1: "native"}
    assert not [c for c in netlink.calls if c[0] == "set_port_vlan"]


# --- bridge-per-VLAN path ----------------------------------------------------------------
def test_fallback_path_puts_each_vlan_on_its_own_bridge(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=False)
    manager.create(SwitchDefinition(name="p", type="private"))
    a10 = manager.attach_nic(VM, nic("a", "p", vlan=10))
    b10 = manager.attach_nic(VM, nic("b", "p", vlan=10))
    c20 = manager.attach_nic(VM, nic("c", "p", vlan=20))
    d = manager.attach_nic(VM, nic("d", "p", vlan=1))
    assert a10.bridge == b10.bridge == vlan_bridge_name("p", 10)
    assert c20.bridge == vlan_bridge_name("p", 20)
    assert d.bridge == bridge_name("p")
    assert ("ensure_bridge", {"mac": None, "vlan_filtering": False}) in calls_for(
        netlink, a10.bridge)
    assert not [c for c in netlink.calls if c[0] == "set_port_vlan"]
    assert manager.status("p").vlan_bridges == sorted([a10.bridge, c20.bridge])
    manager.detach_nic(VM, "a")
    assert a10.bridge in netlink.links              # b still uses VLAN 10
    manager.detach_nic(VM, "b")
    assert a10.bridge not in netlink.links          # last port gone: bridge gone
    manager.detach_nic(VM, "b")                     # idempotent


def test_fallback_external_vlan_uses_8021q_link_of_uplink(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=False)
    manager.create(SwitchDefinition(name="lan", type="external", uplink="eth0"))
    att = manager.attach_nic(VM, nic("nic0", "lan", vlan=30))
    link = vlan_uplink_name("lan", 30)
    assert calls_for(netlink, link)[:2] == [
        ("ensure_vlan_link", {"parent": "eth0", "vid": 30}),
        ("set_master", {"bridge": att.bridge})]
    manager.detach_nic(VM, "nic0")
    assert link not in netlink.links and att.bridge not in netlink.links


def test_fallback_external_vlan_without_8021q_fails_and_leaves_no_tap(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=False, vlan_devices=False)
    manager.create(SwitchDefinition(name="lan", type="external", uplink="eth0"))
    with pytest.raises(Failed, match="neither bridge VLAN filtering nor 802.1Q"):
        manager.attach_nic(VM, nic("nic0", "lan", vlan=30))
    assert tap_name(VM, "nic0") not in netlink.links
    assert vlan_bridge_name("lan", 30) not in netlink.links


# --- refusals change nothing -----------------------------------------------------------------
@pytest.mark.parametrize("defn, error, fragment", [
    (SwitchDefinition(name="x", type="external", uplink="nope0"), InvalidInput, "does not exist"),
    (SwitchDefinition(name="x", type="external", uplink="eth1"), InvalidInput, "cut the host"),
    (SwitchDefinition(name="x", type="external", uplink="lo"), InvalidInput, "does not exist"),
    (SwitchDefinition(name="x", type="internal", host_address="192.168.1.1/24"), InvalidInput,
     "overlaps 192.168.1.0/24 on host interface eth1"),
    (SwitchDefinition(name="x", type="nat", subnet="10.50.0.0/16"), InvalidInput,
     "overlaps 10.50.1.0/24 of switch 'first'"),
    (SwitchDefinition(name="first", type="private"), AlreadyExists, "already exists"),
])
def test_create_refusals_change_nothing(tmp_path, defn, error, fragment):
    manager, netlink, nat = make(tmp_path, filtering=True)
    manager.create(SwitchDefinition(name="first", type="internal", host_address="10.50.1.1/24"))
    before_links, before_docs = dict(netlink.links), dict(manager.store.docs)
    netlink.calls.clear()
    with pytest.raises(error) as err:
        manager.create(defn)
    assert fragment in err.value.message
    assert netlink.calls == [] and nat.calls == []
    assert netlink.links == before_links and manager.store.docs == before_docs


def test_uplink_of_another_switch_is_refused(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=True)
    manager.create(SwitchDefinition(name="a", type="external", uplink="eth0"))
    with pytest.raises(Busy, match="eth0 is already used by switch 'a'"):
        manager.create(SwitchDefinition(name="b", type="external", uplink="eth0"))


def test_delete_in_use_is_refused_with_names(tmp_path):
    users = lambda name: [NicUser("web1", "nic0"), ("db", "nic1")] if name == "lan" else []
    manager, netlink, _ = make(tmp_path, filtering=True, users=users)
    manager.create(SwitchDefinition(name="lan", type="private"))
    netlink.calls.clear()
    with pytest.raises(Busy) as err:
        manager.delete("lan")
    assert err.value.message == ("switch 'lan' is used by VM 'web1' NIC 'nic0',"
                                 " VM 'db' NIC 'nic1'")
    assert netlink.calls == [] and "lan" in manager.store.docs


def test_attach_to_unknown_switch_creates_nothing(tmp_path):
    manager, netlink, _ = make(tmp_path, filtering=True)
    with pytest.raises(NotFound, match="no switch named 'ghost'"):
        manager.attach_nic(VM, nic("nic0", "ghost"))
    assert netlink.calls == []


# --- lifecycle ---------------------------------------------------------------------------
def test_nat_create_picks_free_subnet_and_delete_removes_everything(tmp_path):
    manager, netlink, nat = make(tmp_path, filtering=False)
    created = manager.create(SwitchDefinition(name="nat1", type="nat"))
    assert created.subnet and created.subnet.startswith("10.213.")
    assert manager.get("nat1").subnet == created.subnet          # stored: stable
    br = bridge_name("nat1")
    assert netlink.links[br].addresses == [created.gateway_cidr()]
    assert nat.calls == [("ensure", "nat1", True)]
    manager.attach_nic(VM, nic("nic0", "nat1", vlan=5))
    manager.detach_nic(VM, "nic0")
    manager.attach_nic(VM, nic("nic1", "nat1", vlan=6))
    manager.delete("nat1")
    assert nat.calls[-1] == ("remove", "nat1", False)
    assert not [n for n in netlink.links if n.startswith("pvb")]
    assert manager.store.docs == {} and manager.list() == []


def test_ensure_all_recreates_after_reboot_and_is_idempotent(tmp_path):
    manager, netlink, nat = make(tmp_path, filtering=True)
    manager.create(SwitchDefinition(name="n", type="nat", subnet="10.213.77.0/24"))
    manager.create(SwitchDefinition(name="lan", type="external", uplink="eth0"))
    running = [(VM, nic("nic0", "n", vlan=7))]
    # "reboot": a fresh kernel with only the physical interfaces
    rebooted = RecordingNetlink(vlan_filtering=True)
    rebooted.add_physical("eth0")
    again = SwitchManager(manager.store, tmp_path, netlink=rebooted, nat=nat)
    assert again.ensure_all(running) == {}
    assert rebooted.links[bridge_name("n")].addresses == ["10.213.77.1/24"]
    assert rebooted.links["eth0"].master == bridge_name("lan")
    assert rebooted.links[tap_name(VM, "nic0")].vlans == {7: "native"}
    assert nat.calls[-1] == ("ensure", "n", True)        # bridge was new: rebind dnsmasq
    snapshot = {n: (l.master, l.up, list(l.addresses)) for n, l in rebooted.links.items()}
    assert again.ensure_all(running) == {}
    assert {n: (l.master, l.up, list(l.addresses))
            for n, l in rebooted.links.items()} == snapshot
    assert nat.calls[-1] == ("ensure", "n", False)


def test_ensure_all_reports_a_missing_uplink_and_goes_on(tmp_path):
    manager, netlink, nat = make(tmp_path, filtering=True)
    manager.create(SwitchDefinition(name="lan", type="external", uplink="eth0"))
    manager.create(SwitchDefinition(name="p", type="private"))
    bare = RecordingNetlink(vlan_filtering=True)
    errors = SwitchManager(manager.store, tmp_path, netlink=bare, nat=nat).ensure_all()
    assert errors == {"lan": "uplink eth0 of switch 'lan' is missing"}
    assert bridge_name("p") in bare.links


def test_list_reports_status(tmp_path):
    manager, _, _ = make(tmp_path, filtering=False)
    manager.create(SwitchDefinition(name="n", type="nat", subnet="10.213.78.0/24"))
    [status] = manager.list()
    assert status.bridge_present and status.vlan_mode == "bridge-per-vlan"
    assert status.dhcp_pid == 4242
    assert status.model_dump(mode="json")["definition"]["subnet"] == "10.213.78.0/24"
