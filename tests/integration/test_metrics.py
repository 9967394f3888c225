"""``GET /metrics`` on a real service with a real tiny VM: the text parses with
Prometheus' own parser and the figures agree with ``vm list``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from parvisor.testing.host_fixture import wait_for


def _scrape(host) -> dict[str, list]:
    response = host.api().get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f.samples for f in text_string_to_metric_families(response.text)}
    return families


def _by_label(samples, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples}


def test_metrics_match_vm_list(host):
    host.create_tiny("m1", "--cpus", "2", "--memory", "192M", "--disk-size", "16M")
    host.create_tiny("m2")
    host.cli("vm", "start", "m1")
    wait_for(lambda: host.state("m1") == "running", 60, "m1 running")
    listed = {vm["name"]: vm for vm in host.json("vm", "list")}

    families = _scrape(host)
    states = _by_label(families["parvisor_vms"], "state")
    for state in ("running", "off", "paused", "saved", "crashed"):
        assert states[state] == sum(vm["state"] == state for vm in listed.values()), state
    assert _by_label(families["parvisor_vm_vcpus"], "vm") == {
        name: vm["vcpus"] for name, vm in listed.items()}
    assert _by_label(families["parvisor_vm_memory_bytes"], "vm") == {
        name: vm["memory_bytes"] for name, vm in listed.items()}
    info = {s.labels["vm"]: s.labels for s in families["parvisor_vm_info"]}
    assert info["m1"]["uuid"] == listed["m1"]["uuid"] and info["m2"]["state"] == "off"
    # per-VM runtime series exist only for the running VM
    cpu = _by_label(families["parvisor_vm_cpu_seconds"], "vm")
    assert set(cpu) == {"m1"} and cpu["m1"] > 0
    assert _by_label(families["parvisor_vm_uptime_seconds"], "vm").keys() == {"m1"}
    assert families["parvisor_host_memory_free_bytes"][0].value > 0
    assert families["parvisor_scrape_partial"][0].value == 0
    assert any(s.name == "parvisor_vm_cpu_seconds_total" for s in
               families["parvisor_vm_cpu_seconds"])
    # the data disk's counters come from QMP query-blockstats
    disks = {(s.labels["vm"], s.labels["device"]) for s in families["parvisor_vm_disk_read_ops"]}
    assert {vm for vm, _ in disks} == {"m1"} and len(disks) == 1, disks


def test_cpu_counter_grows(host):
    host.create_tiny("m3")
    host.cli("vm", "start", "m3")
    wait_for(lambda: host.state("m3") == "running", 60, "m3 running")
    first = _by_label(_scrape(host)["parvisor_vm_cpu_seconds"], "vm")["m3"]
    wait_for(lambda: _by_label(_scrape(host)["parvisor_vm_cpu_seconds"], "vm")["m3"] > first,
             30, "the CPU counter to grow")
