"""VM networking for real: tiny guests on virtual switches (bridges + taps), checked
with ping from inside the guests (`vm exec`) and from the host / network namespaces.

Every switch, tap and namespace has a unique name and is removed in teardown (the
``host`` fixture removes switches and taps; this module removes its namespaces)."""

from __future__ import annotations

import secrets
import subprocess

import pytest

pytestmark = pytest.mark.qemu


def uid() -> str:
    return secrets.token_hex(3)


def guest(host, name: str, *argv: str, check: bool = True):
    return host.cli("vm", "exec", name, "--", *argv, check=check)


def guest_ip(host, name: str, cidr: str) -> None:
    guest(host, name, "ip", "addr", "add", cidr, "dev", "eth0")
    guest(host, name, "ip", "link", "set", "eth0", "up")


def pings(host, name: str, address: str) -> bool:
    done = guest(host, name, "ping", "-c", "2", "-W", "2", address, check=False)
    return done.returncode == 0


def boot(host, name: str, *nics: str) -> None:
    args = [arg for nic in nics for arg in ("--nic", nic)]
    host.create_tiny(name, *args)
    host.cli("vm", "start", name)


@pytest.fixture
def netns():
    """Namespaces and veth pairs made by a test, removed afterwards."""
    made: list[tuple[str, str]] = []

    def make(prefix: str) -> tuple[str, str, str]:
        name = f"pvt{uid()}"
        host_end, ns_end = f"{prefix}{uid()}h", f"{prefix}{uid()}n"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(("netns", name))
        subprocess.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end],
                       check=True)
        made.append(("link", host_end))
        subprocess.run(["ip", "link", "set", ns_end, "netns", name], check=True)
        return name, host_end, ns_end
    yield make
    for kind, name in reversed(made):
        if kind == "link":
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        else:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ns_run(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)


def test_private_switch_connects_vms_and_vlans_isolate_them(host):
    switch = f"priv{uid()}"
    host.cli("switch", "create", switch, "--type", "private")
    boot(host, "a", f"{switch},vlan=10")
    boot(host, "b", f"{switch},vlan=10")
    boot(host, "c", f"{switch},vlan=20")
    for name, last in (("a", 1), ("b", 2), ("c", 3)):
        host.wait_agent(name)
        guest_ip(host, name, f"10.77.0.{last}/24")
    assert pings(host, "a", "10.77.0.2")            # same VLAN
    assert not pings(host, "a", "10.77.0.3")        # VLAN 10 cannot reach VLAN 20
    assert host.vm("a")["nics"][0]["vlan"] == 10
    done = host.cli("switch", "delete", switch, check=False)
    assert done.returncode == 1 and "used by VM" in done.stderr


def test_internal_switch_host_and_vm_reach_each_other(host):
    switch = f"int{uid()}"
    host.cli("switch", "create", switch, "--type", "internal", "--host-address",
             "10.78.0.1/24")
    boot(host, "vm1", switch)
    host.wait_agent("vm1")
    guest_ip(host, "vm1", "10.78.0.2/24")
    assert pings(host, "vm1", "10.78.0.1")           # VM -> host
    done = subprocess.run(["busybox", "ping", "-c", "2", "-W", "2", "10.78.0.2"],
                          capture_output=True)
    assert done.returncode == 0                      # host -> VM


def test_nat_switch_gives_an_address_and_reaches_outside(host, netns):
    ns, host_end, ns_end = netns("pvo")
    subprocess.run(["ip", "addr", "add", "10.99.0.1/24", "dev", host_end], check=True)
    subprocess.run(["ip", "link", "set", host_end, "up"], check=True)
    ns_run(ns, "ip", "addr", "add", "10.99.0.2/24", "dev", ns_end)
    ns_run(ns, "ip", "link", "set", ns_end, "up")    # no route back to the NAT subnet
    switch = f"nat{uid()}"
    host.cli("switch", "create", switch, "--type", "nat", "--subnet", "10.213.77.0/24")
    boot(host, "natvm", switch)
    host.wait_agent("natvm")
    from parvisor.testing.host_fixture import wait_for
    wait_for(lambda: any(ip.startswith("10.213.77.") for ip in host.vm("natvm")["ip_addresses"]),
             60, "a DHCP lease in the NAT subnet")
    assert pings(host, "natvm", "10.99.0.2")         # only possible through masquerading


def test_external_switch_bridges_vms_onto_the_uplink(host, netns):
    ns, host_end, ns_end = netns("pve")
    subprocess.run(["ip", "link", "set", host_end, "up"], check=True)
    ns_run(ns, "ip", "addr", "add", "10.98.0.2/24", "dev", ns_end)
    ns_run(ns, "ip", "link", "set", ns_end, "up")
    switch = f"ext{uid()}"
    host.cli("switch", "create", switch, "--type", "external", "--uplink", host_end)
    boot(host, "extvm", switch)
    host.wait_agent("extvm")
    guest_ip(host, "extvm", "10.98.0.3/24")
    assert pings(host, "extvm", "10.98.0.2")


def test_nic_bad_input(host):
    switch = f"bad{uid()}"
    host.cli("switch", "create", switch, "--type", "private")
    for nic, message in ((f"nosuch{uid()}", "no switch named"),
                         (f"{switch},vlan=5000", "4094"),
                         (f"{switch},mac=01:00:5e:00:00:01", "multicast"),
                         (f"{switch},speed=10", "not vlan=N")):
        done = host.cli("vm", "create", "x", "--image", "tiny", "--nic", nic, check=False)
        assert done.returncode == 1 and message in done.stderr, done.stderr
    host.create_tiny("m1", "--nic", f"{switch},mac=02:00:00:00:00:01")
    done = host.cli("vm", "create", "m2", "--image", "tiny", "--nic",
                    f"{switch},mac=02:00:00:00:00:01", check=False)
    assert done.returncode == 1 and "already used" in done.stderr, done.stderr
    assert [vm["name"] for vm in host.json("vm", "list")] == ["m1"]
