"""Pure hot-add decisions: CPU slots, root ports, virtio-mem sizes, DIMMs, cgroup values,
and which fields a running VM may change."""

from __future__ import annotations

import pytest

from parvisor.errors import InvalidInput, StateError
from parvisor.model.vm import ResourceControls
from parvisor.ops.hotplug import merge_settings
from parvisor.ops.hotplug_devices import deleted_matcher
from parvisor.ops.hotplug_plan import (Dimm, cpu_plan, device_port, dimm_plan, free_root_port,
                                       parse_cpu_slots, throttle_arguments, virtio_mem_request)
from parvisor.vm.cgroups import cpu_quota_us, cpu_settings, find_cpu_hierarchy

M = 1 << 20


def slots(plugged: int, total: int = 4) -> list:
    reply = []
    for core in range(total):
        item = {"type": "max-x86_64-cpu", "vcpus-count": 1,
                "props": {"socket-id": 0, "core-id": core, "thread-id": 0}}
        if core < plugged:
            item["qom-path"] = f"/machine/peripheral/vcpu-s0c{core}t0"
        reply.append(item)
    return parse_cpu_slots(reversed(reply))     # QEMU lists the highest first


def test_cpu_plan_adds_lowest_free_and_removes_highest_but_never_the_first():
    plan = cpu_plan(slots(1), 3)
    assert [s.device_id for s in plan.add] == ["vcpu-s0c1t0", "vcpu-s0c2t0"]
    plan = cpu_plan(slots(3), 1)
    assert [s.device_id for s in plan.remove] == ["vcpu-s0c2t0", "vcpu-s0c1t0"]
    assert cpu_plan(slots(2), 2) == cpu_plan(slots(2), 2).__class__()


@pytest.mark.parametrize("target, text", [(0, "at least one"), (5, "maximum of 4")])
def test_cpu_plan_refusals(target, text):
    with pytest.raises(InvalidInput, match=text):
        cpu_plan(slots(1), target)


def test_cpu_removal_refused_when_not_allowed():
    with pytest.raises(InvalidInput, match="TCG"):
        cpu_plan(slots(3), 2, allow_remove=False)
    assert len(cpu_plan(slots(1), 2, allow_remove=False).add) == 1


def pci(ports: dict[str, list[str]], root: list[str] = ()) -> list[dict]:
    devices = [{"qdev_id": q} for q in root]
    for port, behind in ports.items():
        devices.append({"qdev_id": port, "pci_bridge": {
            "bus": {"number": 1}, "devices": [{"qdev_id": q} for q in behind]}})
    return [{"bus": 0, "devices": devices}]


def test_root_ports():
    reply = pci({"hotplug0": ["nic-nic1"], "hotplug1": [], "hotplug2": []}, ["nic-nic0"])
    assert free_root_port(reply) == "hotplug1"
    assert device_port(reply, "nic-nic1") == "hotplug0"
    assert device_port(reply, "nic-nic0") is None          # on the root complex
    with pytest.raises(InvalidInput, match="no free PCIe"):
        free_root_port(pci({"hotplug0": ["x"]}))


@pytest.mark.parametrize("target, expected", [(256, 0), (768, 512), (258, 2)])
def test_virtio_mem_request(target, expected):
    assert virtio_mem_request(base=256 * M, region=768 * M, block=2 * M,
                              target=target * M) == expected * M


@pytest.mark.parametrize("target, text", [(128, "started with 256M"), (2048, "exceeds"),
                                          (257, "blocks of 2M")])
def test_virtio_mem_refusals(target, text):
    with pytest.raises(InvalidInput, match=text):
        virtio_mem_request(base=256 * M, region=768 * M, block=2 * M, target=target * M)


def test_dimm_plan():
    grow = dimm_plan([Dimm("dimm0", 256 * M)], base=256 * M, max_bytes=2048 * M,
                     target=768 * M)
    assert (grow.add_id, grow.add_size) == ("dimm1", 256 * M)
    dimms = [Dimm("dimm0", 256 * M), Dimm("dimm1", 128 * M)]
    assert dimm_plan(dimms, base=256 * M, max_bytes=2048 * M,
                     target=256 * M).remove == (Dimm("dimm1", 128 * M), Dimm("dimm0", 256 * M))
    with pytest.raises(InvalidInput, match="whole hot-added DIMMs"):
        dimm_plan(dimms, base=256 * M, max_bytes=2048 * M, target=384 * M)
    with pytest.raises(InvalidInput, match="multiples of 128M"):
        dimm_plan([], base=256 * M, max_bytes=2048 * M, target=300 * M)
    with pytest.raises(InvalidInput, match="no free memory slot"):
        dimm_plan([Dimm(f"dimm{i}", 128 * M) for i in range(8)], base=256 * M,
                  max_bytes=4096 * M, target=2048 * M)


def test_cgroup_values():
    assert cpu_quota_us(0, 4) is None
    assert cpu_quota_us(50, 1) == 50_000 and cpu_quota_us(50, 3) == 150_000
    limited = ResourceControls(cpu_weight=200, cpu_limit_pct=25)
    assert dict(cpu_settings("v2", limited, 2).files) == {"cpu.weight": "200",
                                                          "cpu.max": "50000 100000"}
    assert dict(cpu_settings("v1", ResourceControls(), 2).files) == {
        "cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"}


def test_cpu_hierarchy_detection(tmp_path):
    assert find_cpu_hierarchy(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert find_cpu_hierarchy(tmp_path).kind == "v1"
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("cpu memory\n")
    assert find_cpu_hierarchy(tmp_path).root == tmp_path / "unified"


def test_throttle_arguments_share_one_group():
    args = throttle_arguments("disk-disk1", ResourceControls(disk_iops_limit=500), "tg-1")
    assert args["iops"] == 500 and args["bps"] == 0 and args["group"] == "tg-1"


def test_device_deleted_matching():
    cpu = deleted_matcher("/machine/peripheral/vcpu-s0c2t0", children=True)
    assert cpu({"path": "/machine/peripheral/vcpu-s0c2t0/lapic"})
    nic = deleted_matcher("nic-nic1")
    assert nic({"device": "nic-nic1", "path": "/machine/peripheral/nic-nic1"})
    assert not nic({"path": "/machine/peripheral/nic-nic1/virtio-backend"})


def test_merge_settings_fills_and_disables():
    data = {"memory_bytes": 256 * M, "max_memory_bytes": 256 * M, "dynamic_memory": None,
            "resources": ResourceControls().model_dump()}
    changes = {"dynamic_memory": {"enabled": True, "max": 512 * M},
               "resources": {"disk_bandwidth_limit": 10 * M}}
    merge_settings(data, changes)
    assert changes["dynamic_memory"] == {"min_bytes": 256 * M, "max_bytes": 512 * M,
                                         "buffer_pct": 20}
    assert changes["resources"]["disk_bandwidth_bytes"] == 10 * M
    assert data["max_memory_bytes"] == 512 * M
    off = {"dynamic_memory": {"enabled": False}}
    merge_settings(data, off)
    assert off["dynamic_memory"] is None


def test_running_vms_refuse_shape_changes():
    from types import SimpleNamespace
    from parvisor.model.states import VmState
    from parvisor.ops.hotplug import refuse_restart_fields
    record = SimpleNamespace(state=VmState.RUNNING, definition=SimpleNamespace(
        dynamic_memory=None))
    with pytest.raises(StateError, match="max_vcpus"):
        refuse_restart_fields("a", record, {"max_vcpus": 8, "vcpus": 2})
    refuse_restart_fields("a", record, {"vcpus": 2, "notes": "x", "resources": {}})
