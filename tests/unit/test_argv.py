"""The QEMU command line, pinned by golden files (one argument per line).

Regenerate after an intended change with ``PARVISOR_REWRITE_GOLDEN=1``; a missing
golden fails, so a new case is always looked at once before it is trusted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from parvisor.model.vm import VmDefinition
from parvisor.vm import argv as qargv
from parvisor.vm.argv import LaunchSpec, build_argv, tap_name
from parvisor.vm.paths import VmPaths

GOLDEN_DIR = Path(__file__).parent / "golden" / "argv"
STATE_DIR = Path("/var/lib/parvisor")
UUID = "0b0e5a4e-5c1d-4d7e-9a55-3f2b8c6d7e01"


def definition(**overrides: object) -> VmDefinition:
    data: dict[str, object] = {
        "name": "web01", "uuid": UUID,
        "boot": {"kind": "kernel", "kernel": "/images/vmlinuz",
                 "initrd": "/images/initrd.img", "cmdline": "console=ttyS0 quiet"},
    }
    data.update(overrides)
    return VmDefinition.model_validate(data)


def spec(vm: VmDefinition, **overrides: object) -> LaunchSpec:
    values: dict[str, object] = {"accelerator": "tcg"}
    values.update(overrides)
    return LaunchSpec(definition=vm, paths=VmPaths(STATE_DIR, vm.uuid), **values)  # type: ignore[arg-type]


def check_golden(name: str, argv: list[str]) -> None:
    path = GOLDEN_DIR / f"{name}.txt"
    text = "\n".join(argv) + "\n"
    if os.environ.get("PARVISOR_REWRITE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run with PARVISOR_REWRITE_GOLDEN=1"
                    " and review it")
    assert text == path.read_text(), f"argv differs from {path}"


TWO_DISKS_TWO_NICS = {
    "name": "db02", "uuid": UUID, "vcpus": 2, "max_vcpus": 8,
    "memory_bytes": "1G", "max_memory_bytes": "4G",
    "boot": {"kind": "disk"},
    "disks": [
        {"id": "root", "path": "/var/lib/parvisor/disks/db02-root.qcow2", "bus": "virtio-blk"},
        {"id": "legacy", "path": "/var/lib/parvisor/disks/legacy.img", "format": "raw",
         "bus": "ide"},
    ],
    "nics": [
        {"id": "eth0", "switch": "external", "mac": "52:54:00:12:34:56", "model": "virtio"},
        {"id": "eth1", "switch": "private", "mac": "52:54:00:12:34:57", "model": "e1000"},
    ],
}


def test_golden_tcg_kernel_minimal() -> None:
    check_golden("tcg_kernel_minimal", build_argv(spec(definition())))


def test_golden_kvm_two_disks_two_nics() -> None:
    vm = VmDefinition.model_validate(TWO_DISKS_TWO_NICS)
    check_golden("kvm_two_disks_two_nics", build_argv(spec(vm, accelerator="kvm")))


def test_golden_incoming_paused() -> None:
    check_golden("tcg_incoming_paused",
                 build_argv(spec(definition(), incoming=True, start_paused=True)))


def test_golden_run_as() -> None:
    check_golden("tcg_run_as", build_argv(spec(definition(), run_as="parvisor-qemu",
                                                qemu_binary="/usr/bin/qemu-system-x86_64")))


def test_accelerator_picks_cpu_model() -> None:
    assert qargv.machine_args(spec(definition(), accelerator="kvm")) == [
        "-machine", "q35", "-accel", "kvm", "-cpu", "host"]
    assert qargv.machine_args(spec(definition())) == [
        "-machine", "q35", "-accel", "tcg", "-cpu", "max"]


def test_start_flags() -> None:
    assert qargv.start_args(spec(definition())) == []
    assert qargv.start_args(spec(definition(), start_paused=True)) == ["-S"]
    assert qargv.start_args(spec(definition(), incoming=True)) == ["-S", "-incoming", "defer"]


def test_sandbox_denies_privileges_unless_run_as() -> None:
    [_, plain] = qargv.sandbox_args(spec(definition()))
    [_, run_as] = qargv.sandbox_args(spec(definition(), run_as="nobody"))
    assert "elevateprivileges=deny" in plain and "spawn=deny" in plain
    # -runas needs setuid/setgid after the filter is installed (measured: =deny and
    # =children kill QEMU with SIGSYS); spawn=deny still forbids exec.
    assert "elevateprivileges=allow" in run_as and "spawn=deny" in run_as


def test_memory_hotplug_slots_only_when_max_exceeds_memory() -> None:
    assert qargv.memory_args(spec(definition(memory_bytes="512M"))) == ["-m", "size=512M"]
    assert qargv.memory_args(spec(definition(memory_bytes="512M", max_memory_bytes="2G",
                                             memory_hotplug="dimm"))) == [
        "-m", "size=512M,slots=8,maxmem=2048M"]


def test_commas_in_paths_are_escaped() -> None:
    vm = definition(disks=[{"id": "d0", "path": "/data/a,b.qcow2"}])
    args = qargv.disks_args(spec(vm))
    assert "filename=/data/a,,b.qcow2" in args[1]
    paths = VmPaths(Path("/srv/odd,dir"), UUID)
    serial = qargv.serial_args(LaunchSpec(definition(), paths, "tcg"))[1]
    assert "path=/srv/odd,,dir/vms/" in serial


def test_virtio_scsi_disks_get_one_controller() -> None:
    vm = definition(disks=[{"id": "a", "path": "/a", "bus": "virtio-scsi"},
                           {"id": "b", "path": "/b", "bus": "virtio-scsi"}])
    argv = build_argv(spec(vm))
    assert argv.count("virtio-scsi-pci,id=scsi0") == 1
    assert sum(a.startswith("scsi-hd,bus=scsi0.0,") for a in argv) == 2


def test_ide_ports_are_assigned_in_order_and_limited() -> None:
    disks = [{"id": f"d{i}", "path": f"/d{i}", "bus": "ide" if i % 2 else "ahci"}
             for i in range(6)]
    argv = build_argv(spec(definition(disks=disks)))
    assert [a.split(",")[1] for a in argv if a.startswith("ide-hd")] == [
        f"bus=ide.{i}" for i in range(6)]
    with pytest.raises(ValueError, match="at most 6"):
        build_argv(spec(definition(disks=disks + [{"id": "d6", "path": "/d6", "bus": "ide"}])))


def test_read_only_ide_disk_is_refused() -> None:
    # refused where the definition is made, so the user hears it at create time
    with pytest.raises(ValueError, match="read-only"):
        definition(disks=[{"id": "cd", "path": "/x.img", "bus": "ide", "readonly": True}])
    vm = definition(disks=[{"id": "ro", "path": "/x.img", "readonly": True}])
    assert any("read-only=on" in a for a in build_argv(spec(vm)))


def test_unusual_device_ids_become_stable_safe_ids() -> None:
    vm = definition(disks=[{"id": "1st disk!", "path": "/x"}])
    file_node, fmt_node = qargv.disk_node_names(vm.disks[0])
    assert file_node == qargv.disk_node_names(vm.disks[0])[0]
    assert file_node.startswith("file-h") and len(fmt_node) <= 31
    assert " " not in qargv.disk_device_id(vm.disks[0])


def test_tap_name_is_short_deterministic_and_distinct() -> None:
    name = tap_name(UUID, "eth0")
    assert name.startswith("pv") and len(name) <= 15
    assert name == tap_name(UUID, "eth0")
    assert name != tap_name(UUID, "eth1")
    assert name != tap_name("0b0e5a4e-5c1d-4d7e-9a55-3f2b8c6d7e02", "eth0")


CD_AND_BOOT_ORDER = {
    "name": "install", "uuid": UUID, "boot": {"kind": "disk"},
    "boot_order": ["cd0", "root"],
    "disks": [
        {"id": "root", "path": "/var/lib/parvisor/storage/vms/install/root.qcow2"},
        {"id": "data", "path": "/srv/tmpfs/data.raw", "format": "raw", "bus": "virtio-scsi"},
        {"id": "cd0", "path": "/var/lib/parvisor/storage/iso/debian.iso", "format": "raw",
         "bus": "ahci", "media": "cdrom", "readonly": True},
        {"id": "cd1", "path": None, "bus": "virtio-scsi", "media": "cdrom", "readonly": True},
    ],
}


def test_golden_cd_drives_boot_order_and_buffered_disk() -> None:
    vm = VmDefinition.model_validate(CD_AND_BOOT_ORDER)
    check_golden("tcg_cd_boot_order", build_argv(spec(vm, buffered_disks=frozenset({"data"}))))


def test_disk_cache_defaults_direct_native_and_thin() -> None:
    vm = definition(disks=[{"id": "d0", "path": "/d0.qcow2"}])
    file_node, fmt_node = qargv.disks_args(spec(vm))[1:4:2]
    assert "cache.direct=on,aio=native,discard=unmap" in file_node
    assert "cache.direct=on,discard=unmap,detect-zeroes=unmap" in fmt_node
    buffered = qargv.disks_args(spec(vm, buffered_disks=frozenset({"d0"})))
    assert "cache.direct=off,aio=threads" in buffered[1]


def test_boot_order_sets_bootindex_only_on_listed_devices() -> None:
    vm = definition(disks=[{"id": "a", "path": "/a"}, {"id": "b", "path": "/b"}],
                    boot_order=["b"])
    devices = [a for a in build_argv(spec(vm)) if a.startswith("virtio-blk-pci")]
    assert devices == ["virtio-blk-pci,drive=fmt-a,id=disk-a",
                       "virtio-blk-pci,drive=fmt-b,id=disk-b,bootindex=0"]


def test_empty_cd_drive_has_no_block_nodes() -> None:
    vm = definition(disks=[{"id": "cd0", "path": None, "media": "cdrom", "bus": "ide",
                            "readonly": True}])
    assert qargv.disks_args(spec(vm)) == ["-device", "ide-cd,bus=ide.0,id=disk-cd0"]


def test_every_part_returns_strings() -> None:
    vm = VmDefinition.model_validate(TWO_DISKS_TWO_NICS)
    s = spec(vm, run_as="x", incoming=True)
    for part in qargv._PARTS:
        args = part(s)
        assert isinstance(args, list) and all(isinstance(a, str) for a in args), part.__name__


# --- firmware generations and guest OS (parvisor.vm.firmware) ----------------------------
def test_golden_gen2_uefi_disk_boot() -> None:
    vm = definition(generation=2, boot={"kind": "disk"},
                    disks=[{"id": "boot", "path": "/var/lib/parvisor/storage/vms/b.qcow2"}])
    check_golden("tcg_gen2_uefi_disk", build_argv(spec(vm)))


def test_golden_gen2_secure_boot_with_tpm() -> None:
    vm = definition(generation=2, secure_boot=True, tpm=True)
    check_golden("tcg_gen2_secure_boot_tpm", build_argv(spec(vm)))


def test_golden_windows_under_kvm_has_hyperv_enlightenments() -> None:
    vm = definition(os_type="windows", generation=2, tpm=True)
    check_golden("kvm_windows_gen2", build_argv(spec(vm, accelerator="kvm")))


def test_golden_cluster_cpu_baseline() -> None:
    # processor compatibility mode: the named model, enforced, enlightenments as before
    vm = definition(os_type="windows", generation=2)
    check_golden("kvm_windows_cpu_baseline",
                 build_argv(spec(vm, accelerator="kvm", cpu_baseline="Skylake-Server")))
    assert qargv.machine_args(spec(definition(), cpu_baseline="qemu64"))[-1] == "qemu64,enforce"


def test_windows_under_tcg_gets_no_enlightenments_but_local_time() -> None:
    argv = build_argv(spec(definition(os_type="windows")))
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-rtc") + 1] == "base=localtime"


# --- hot-add layouts (issue 4) ------------------------------------------------------------
def test_golden_virtio_mem_layout() -> None:
    vm = definition(vcpus=1, memory_bytes="256M", max_memory_bytes="1G")
    check_golden("tcg_virtio_mem", build_argv(spec(vm)))


def test_golden_dynamic_memory_balloon() -> None:
    vm = definition(memory_bytes="256M", max_memory_bytes="256M",
                    dynamic_memory={"min_bytes": 128 << 20, "max_bytes": 512 << 20})
    check_golden("tcg_dynamic_memory", build_argv(spec(vm)))


def test_virtio_mem_region_is_whole_blocks_and_absent_without_headroom() -> None:
    assert qargv.virtio_mem_region(definition(memory_bytes="256M")) == 0
    odd = definition(memory_bytes="256M", max_memory_bytes="1025M")
    assert qargv.virtio_mem_region(odd) == 768 << 20
    assert qargv.memory_args(spec(odd))[1] == "size=256M,maxmem=1024M"


def test_windows_guests_default_to_dimm_slots() -> None:
    assert definition(os_type="windows").memory_hotplug == "dimm"
    assert definition().memory_hotplug == "virtio-mem"


def test_an_incoming_migration_runs_the_sources_versioned_machine_type():
    from parvisor.vm.argv import machine_args
    plain = machine_args(spec(definition()))
    pinned = machine_args(spec(definition(), machine_version="pc-q35-7.2"))
    assert plain[plain.index("-machine") + 1].split(",")[0] == "q35"
    # the version replaces the alias; the machine's options stay
    assert pinned[pinned.index("-machine") + 1] == ",".join(
        ["pc-q35-7.2", *plain[plain.index("-machine") + 1].split(",")[1:]])


# --- network boot (PXE): NICs in the boot order ----------------------------------------
PXE_FIRST = {
    "name": "pxe", "uuid": UUID, "generation": 2, "boot": {"kind": "disk"},
    "boot_order": ["nic1", "root"],
    "disks": [{"id": "root", "path": "/var/lib/parvisor/storage/vms/pxe/root.qcow2"}],
    "nics": [
        {"id": "nic0", "switch": "lab", "mac": "02:70:76:00:00:01"},
        {"id": "nic1", "switch": "lab", "mac": "02:70:76:00:00:02", "model": "e1000"},
    ],
}


def test_golden_gen2_network_boot_first() -> None:
    vm = VmDefinition.model_validate(PXE_FIRST)
    check_golden("tcg_gen2_pxe_first", build_argv(spec(vm)))


def _devices(argv: list[str], prefix: str) -> list[str]:
    return [a for a in argv if a.startswith(prefix)]


def test_a_nic_in_the_boot_order_gets_its_position_as_bootindex() -> None:
    vm = VmDefinition.model_validate(PXE_FIRST)
    argv = build_argv(spec(vm))
    assert _devices(argv, "e1000") == [
        "e1000,netdev=net-nic1,id=nic-nic1,mac=02:70:76:00:00:02,bootindex=0"]
    assert _devices(argv, "virtio-blk-pci") == [
        "virtio-blk-pci,drive=fmt-root,id=disk-root,bootindex=1"]
    # the NIC left out of the boot order never network-boots
    assert _devices(argv, "virtio-net-pci") == [
        "virtio-net-pci,netdev=net-nic0,id=nic-nic0,mac=02:70:76:00:00:01"]


def test_nics_get_no_bootindex_without_a_boot_order() -> None:
    # booting from disk with no explicit order: the disks in order, no PXE at all
    vm = VmDefinition.model_validate({**PXE_FIRST, "boot_order": []})
    argv = build_argv(spec(vm))
    assert not [a for a in argv if "netdev=" in a and "bootindex" in a]
    assert _devices(argv, "virtio-blk-pci")[0].endswith(",bootindex=0")


def test_a_virtio_nic_can_be_the_boot_device_too() -> None:
    vm = VmDefinition.model_validate({**PXE_FIRST, "boot_order": ["nic0"]})
    argv = build_argv(spec(vm))
    assert _devices(argv, "virtio-net-pci")[0].endswith(",bootindex=0")
    assert not [a for a in argv if a.startswith(("e1000", "virtio-blk-pci"))
                and "bootindex" in a]


def test_golden_shared_disk_next_to_a_plain_scsi_disk() -> None:
    # guest clustering: share-rw=on, a serial derived from the file, always cache=none
    vm = definition(disks=[
        {"id": "data", "path": "/var/lib/parvisor/d.qcow2", "bus": "virtio-scsi"},
        {"id": "quorum", "path": "/cluster/shared/quorum.raw", "format": "raw",
         "bus": "virtio-scsi", "shared": True}])
    check_golden("tcg_shared_disk", build_argv(spec(vm, buffered_disks=frozenset({"quorum"}))))
