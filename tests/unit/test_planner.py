"""Consolidation planning: hand-checked small estates, generated estates of 100 / 1,000 /
10,000 servers (never over capacity, at most 1.25 x the lower bound), bad inputs."""

from __future__ import annotations

import json

import pytest

from parvisor.errors import InvalidInput
from parvisor.testing.estates import generated_estate
from parvisor.planner import (
    HostModel, Server, parse_host_model, parse_inventory, parse_inventory_text, plan,
    render_html, render_text)

HEADER = "name,cores,ghz,cpu_avg_pct,cpu_peak_pct,ram_gb,ram_used_gb,disk_gb"
HOST = HostModel("h", cores=10, ghz=2.0, ram_gb=100, disk_gb=1000)   # 20 GHz


def srv(name: str, ghz_peak: float, ram: float, disk: float = 10, avg: float = 1.0
        ) -> Server:
    # 20 cores of 1 GHz at ghz_peak*5 %: the CPU demand is ghz_peak GHz at peak
    return Server(name, 20, 1.0, min(avg, ghz_peak) * 5, ghz_peak * 5, ram, ram / 2, disk)


generated = generated_estate   # shared with the benchmark


# --- hand-checked --------------------------------------------------------------------------
def test_three_servers_need_two_hosts_plus_reserve():
    # usable at 0 % headroom: 20 GHz, 100 GB. 12+12 GHz cannot share; 12+6 can.
    servers = [srv("a", 12, 10), srv("b", 12, 10), srv("c", 6, 10)]
    result = plan(servers, [HOST], headroom_pct=0, reserve=1)
    assert (result.active_hosts, result.reserve, result.hosts_needed) == (2, 1, 3)
    assert result.lower_bound == 2                     # ceil(30 GHz / 20 GHz)
    assert result.placements["a"] != result.placements["b"]
    assert len(result.hosts[-1].servers) == 0          # the reserve host is empty


def test_headroom_shrinks_the_host():
    servers = [srv(f"s{i}", 5, 10) for i in range(4)]   # 20 GHz in total
    assert plan(servers, [HOST], headroom_pct=0, reserve=0).active_hosts == 1
    assert plan(servers, [HOST], headroom_pct=20, reserve=0).active_hosts == 2  # 16 GHz


def test_cpu_basis_avg_and_ram_basis_used():
    servers = [srv(f"s{i}", 8, 40, avg=2) for i in range(4)]  # peak 32 GHz, avg 8 GHz
    assert plan(servers, [HOST], headroom_pct=0, reserve=0).active_hosts == 2
    avg = plan(servers, [HOST], headroom_pct=0, reserve=0, cpu_basis="avg")
    assert avg.active_hosts == 2                        # RAM 160 GB allocated needs 2
    used = plan(servers, [HOST], headroom_pct=0, reserve=0, cpu_basis="avg",
                ram_basis="used")
    assert used.active_hosts == 1                       # 8 GHz, 80 GB used


def test_ram_dominant_estate():
    servers = [srv(f"s{i}", 1, 60) for i in range(5)]   # 60 GB each: one per host
    result = plan(servers, [HOST], headroom_pct=0, reserve=0)
    assert result.active_hosts == result.lower_bound + 2 == 5
    assert max(h.utilization_pct["ram_gb"] for h in result.hosts) == 60.0


def test_cheapest_model_wins_else_fewest_hosts():
    small = HostModel("small", 10, 2.0, 100, 1000, cost=1000)
    big = HostModel("big", 40, 2.0, 400, 4000, cost=5000)
    servers = [srv(f"s{i}", 10, 10) for i in range(8)]  # 80 GHz
    result = plan(servers, [big, small], headroom_pct=0, reserve=1)
    # small: 4 + 1 hosts = 5000; big: 1 + 1 = 10000
    assert result.host_model.name == "small" and result.total_cost == 5000
    free = plan(servers, [HostModel("small", 10, 2.0, 100, 1000),
                          HostModel("big", 40, 2.0, 400, 4000)], headroom_pct=0)
    assert free.host_model.name == "big" and free.hosts_needed == 2


def test_server_bigger_than_every_model_is_refused():
    with pytest.raises(InvalidInput, match=r"bigger than every host model.*'huge' needs "
                                           r"500 ram_gb"):
        plan([srv("ok", 1, 10), srv("huge", 1, 500)], [HOST])


def test_a_model_too_small_for_one_server_is_skipped():
    big = HostModel("big", 10, 2.0, 1000, 1000)
    result = plan([srv("a", 1, 500)], [HOST, big])
    assert result.host_model.name == "big"
    assert [o.eligible for o in result.options] == [False, True]


def test_json_and_html_reports():
    result = plan([srv("<script>", 12, 10), srv("b", 12, 10)], [HOST], headroom_pct=0)
    data = json.loads(result.to_json())
    assert data["hosts_needed"] == 3 and data["reserve"] == 1 and data["lower_bound"] == 2
    assert data["placements"]["b"].startswith("h-")
    page = render_html(result)
    assert "<svg" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert "h-001" in render_text(result)


# --- generated estates ---------------------------------------------------------------------
@pytest.mark.parametrize("count", [100, 1000, 10000])
def test_generated_estates_fit_and_stay_near_the_bound(count):
    servers = generated(count, seed=count)
    model = HostModel("std", 32, 2.6, 384, 8000)
    result = plan(servers, [model], headroom_pct=20, reserve=1)   # speed: bench/planner.py
    assert sorted(result.placements) == sorted(s.name for s in servers)
    for host in result.hosts:                            # never over usable capacity
        assert all(pct <= 80.0 + 1e-6 for pct in host.utilization_pct.values()), host
    assert result.active_hosts <= 1.25 * result.lower_bound
    assert result.hosts_needed == result.active_hosts + 1


# --- bad input ------------------------------------------------------------------------------
def test_inventory_parses_with_optional_iops(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(HEADER + ",iops\nweb1,4,2.5,10,40,8,6,100,300\n\n")
    (server,) = parse_inventory(path)
    assert (server.name, server.cores, server.iops) == ("web1", 4, 300)


@pytest.mark.parametrize("text,message", [
    ("name,cores,ghz\nweb,1,2\n", r"missing column\(s\) cpu_avg_pct"),
    (HEADER + "\nweb,4,2.5,10,40,8,6,-1\n", r"line 2, column disk_gb: '-1' must be"),
    (HEADER + "\nweb,four,2.5,10,40,8,6,1\n", r"line 2, column cores: 'four' is not a num"),
    (HEADER + "\nweb,4,2.5,10,140,8,6,1\n", r"cpu_peak_pct: 140 is over 100"),
    (HEADER + "\nweb,4,2.5,50,40,8,6,1\n", "cpu_avg_pct 50 is above cpu_peak_pct 40"),
    (HEADER + "\nweb,4,2.5,10,40,8,9,1\n", "ram_used_gb 9 is above ram_gb 8"),
    (HEADER + "\nweb,4,2.5,10,40,8,6,1\nweb,4,2.5,10,40,8,6,1\n", "listed twice"),
    (HEADER + "\nweb,4,nan,10,40,8,6,1\n", "column ghz: 'nan' must be"),
    (HEADER + "\n", "no servers"),
])
def test_bad_inventories(text, message):
    with pytest.raises(InvalidInput, match=message):
        parse_inventory_text(text, source="s.csv")


def test_host_model_specs():
    model = parse_host_model("r740:cores=32,ghz=2.6,ram_gb=384,disk_gb=8000,cost=12000")
    assert (model.name, model.cpu_ghz, model.cost) == ("r740", 32 * 2.6, 12000)
    for spec, message in [("r740", "expected NAME:"), ("x:cores=4,ghz=2", "missing ram_gb"),
                          ("x:cores=4,ghz=2,ram_gb=8,disk_gb=1,color=red", "'color=red'"),
                          ("x:cores=0,ghz=2,ram_gb=8,disk_gb=1", "positive"),
                          ("x:cores=2.5,ghz=2,ram_gb=8,disk_gb=1", "whole number")]:
        with pytest.raises(InvalidInput, match=message):
            parse_host_model(spec)
