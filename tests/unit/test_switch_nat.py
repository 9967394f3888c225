"""NAT switch pieces that need no kernel: the nft ruleset and the dnsmasq command line."""

from pathlib import Path

from parvisor.switch.manager import nat_plan
from parvisor.switch.model import SwitchDefinition
from parvisor.switch.nat import dnsmasq_argv, nft_ruleset


def plan(tmp_path: Path):
    defn = SwitchDefinition(name="n1", type="nat", subnet="10.213.5.0/24")
    return nat_plan(defn, tmp_path)


def test_ruleset_replaces_only_its_own_table(tmp_path):
    p = plan(tmp_path)
    text = nft_ruleset(p)
    assert text.startswith(f"add table ip {p.table}\ndelete table ip {p.table}\n")
    assert "ip saddr 10.213.5.0/24 ip daddr != 10.213.5.0/24 masquerade" in text
    assert f'iifname "{p.bridge}" accept' in text
    assert text.count("table ip ") == 3 and "flush ruleset" not in text


def test_dnsmasq_is_dhcp_only_bound_to_the_bridge_with_own_files(tmp_path):
    p = plan(tmp_path)
    argv = dnsmasq_argv(p)
    assert "--port=0" in argv and "--bind-interfaces" in argv
    assert f"--interface={p.bridge}" in argv
    assert f"--pid-file={tmp_path}/switches/n1/dnsmasq.pid" in argv
    assert f"--dhcp-leasefile={tmp_path}/switches/n1/dnsmasq.leases" in argv
    assert "--dhcp-range=10.213.5.2,10.213.5.254,255.255.255.0,1h" in argv
    assert "--conf-file=/dev/null" in argv      # never read the system's dnsmasq.conf
