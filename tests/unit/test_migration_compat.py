"""Compatibility checks before a VM moves: one test per refusal, the OK case, and the
cluster CPU baseline choice. All pure: facts in, reasons out."""

from __future__ import annotations

import ast
import inspect
from dataclasses import replace

import pytest

from parvisor.hypervisor.facts import MigrationFacts
from parvisor.migration import compat
from parvisor.migration.compat import (DEFAULT_CPU_BASELINES, check_migration, choose_cpu_baseline,
                                       memory_needed, migration_machine_type)
from parvisor.model.vm import VmDefinition

GiB = 1 << 30
SHARED = "/srv/shared"
H1 = MigrationFacts(
    host="h1", accelerator="kvm", qemu_version="7.2.22", host_cpu_model="Intel Xeon Gold 6230",
    machine_types=("pc-i440fx-7.2", "pc-q35-7.1", "pc-q35-7.2"),
    machine_aliases=(("pc", "pc-i440fx-7.2"), ("q35", "pc-q35-7.2")),
    cpu_models=("Cascadelake-Server", "Skylake-Server", "Westmere", "host", "max", "qemu64"),
    switches=("external", "private"), storage_roots=(SHARED, "/var/lib/parvisor/storage"),
    shared_storage=SHARED, free_memory_bytes=16 * GiB, migration_address="10.0.0.1")
H2 = replace(H1, host="h2", migration_address="10.0.0.2")
VM = VmDefinition.model_validate({
    "name": "web01", "memory_bytes": "2G", "boot": {"kind": "disk"},
    "disks": [{"id": "root", "path": f"{SHARED}/vms/web01/root.qcow2"}],
    "nics": [{"id": "eth0", "switch": "external", "mac": "52:54:00:12:34:56"}]})
DISKS = [f"{SHARED}/vms/web01/root.qcow2", f"{SHARED}/bases/debian.qcow2"]


def check(dest: MigrationFacts = H2, *, vm: VmDefinition = VM, source: MigrationFacts = H1,
          baseline: str | None = "Skylake-Server", with_storage: bool = False,
          disks: list[str] = DISKS, memory: int = 2 * GiB) -> list[str]:
    return check_migration(vm, vm_memory_bytes=memory, source=source, dest=dest,
                           dest_name=dest.host, cpu_baseline=baseline,
                           with_storage=with_storage, disk_paths=disks)


def only(reasons: list[str], *fragments: str) -> str:
    assert len(reasons) == 1, reasons
    for fragment in fragments:
        assert fragment in reasons[0], reasons[0]
    return reasons[0]


def test_compatible_hosts_may_move() -> None:
    assert check() == []
    assert check(baseline=None) == []          # identical hosts: host passthrough is fine
    assert migration_machine_type(VM, H1) == "pc-q35-7.2"


def test_different_accelerator_is_refused() -> None:
    only(check(replace(H2, accelerator="tcg")),
         "h2 runs TCG, this VM runs under KVM on h1: QEMU cannot migrate between accelerators")


def test_missing_machine_type_is_refused_with_versions() -> None:
    older = replace(H2, qemu_version="7.1.0", machine_types=("pc-q35-7.1",),
                    machine_aliases=(("q35", "pc-q35-7.1"),))
    only(check(older), "h2 (QEMU 7.1.0) lacks machine type pc-q35-7.2",
         "upgrade QEMU on h2 to 7.2.22 or newer")
    # a newer destination keeps the old versioned types: fine
    newer = replace(H2, qemu_version="8.2.0", machine_types=("pc-q35-7.2", "pc-q35-8.2"))
    assert check(newer) == []


def test_secure_boot_machine_options_do_not_hide_the_type() -> None:
    vm = VM.model_copy(update={"generation": 2, "secure_boot": True})
    assert migration_machine_type(vm, H1) == "pc-q35-7.2"


def test_baseline_the_destination_cannot_run_is_refused() -> None:
    amd = replace(H2, host_cpu_model="AMD EPYC 7452", cpu_models=("EPYC", "Westmere", "qemu64"))
    only(check(amd), "h2 cannot run CPU model Skylake-Server",
         "set a cluster CPU baseline every host runs (both hosts run Westmere)")


def test_host_passthrough_between_different_cpus_is_refused() -> None:
    other = replace(H2, host_cpu_model="AMD EPYC 7452")
    only(check(other, baseline=None), "'host' CPU model",
         "CPU model name AMD EPYC 7452 on h2 vs Intel Xeon Gold 6230 on h1",
         "set a cluster CPU baseline (both hosts run Cascadelake-Server)")
    only(check(replace(H2, qemu_version="8.0.0"), baseline=None), "QEMU version 8.0.0 on h2")


def test_tcg_max_depends_only_on_the_qemu_version() -> None:
    src, dst = replace(H1, accelerator="tcg"), replace(H2, accelerator="tcg",
                                                       host_cpu_model="AMD EPYC 7452")
    assert check(dst, source=src, baseline=None) == []
    only(check(replace(dst, qemu_version="7.2.1"), source=src, baseline=None),
         "'max' CPU model", "QEMU version 7.2.1 on h2 vs 7.2.22 on h1")


def test_missing_switch_is_refused_per_switch() -> None:
    vm = VM.model_copy(update={"nics": (
        *VM.nics, VM.nics[0].model_copy(update={"id": "eth1", "switch": "private"}))})
    only(check(replace(H2, switches=("external",)), vm=vm),
         "h2 has no virtual switch 'private' (used by NIC eth1)", "create it on h2")


def test_disk_outside_shared_storage_is_refused_without_storage_move() -> None:
    local = "/var/lib/parvisor/storage/vms/web01/data.qcow2"    # same root path on h2 too
    only(check(disks=[*DISKS, local]),
         f"disk {local} is not on the cluster shared storage h2 sees ({SHARED})",
         "move the VM with its storage")
    assert len(check(replace(H2, shared_storage=None))) == len(DISKS)


def test_unresolved_paths_are_not_trusted() -> None:
    only(check(disks=[f"{SHARED}/../etc/disk.qcow2"]), "is not on the cluster shared storage")
    only(check(disks=["shared/disk.qcow2"]), "is not on the cluster shared storage")


def test_storage_move_needs_a_storage_root_on_the_destination() -> None:
    local = ["/var/lib/parvisor/storage/vms/web01/root.qcow2"]
    assert check(disks=local, with_storage=True) == []
    only(check(replace(H2, storage_roots=()), disks=local, with_storage=True),
         "h2 has no storage root to copy the disks into")


def test_too_little_memory_is_refused_with_the_margin() -> None:
    need = memory_needed(2 * GiB)
    assert need == 2 * GiB + (64 << 20) + 2 * GiB // 50
    assert check(replace(H2, free_memory_bytes=need)) == []
    only(check(replace(H2, free_memory_bytes=need - 1)),
         "this VM needs", "(2G + 64M + 2 % for QEMU)", "free memory on h2")


def test_older_destination_is_refused_clearly() -> None:
    old = MigrationFacts.from_dict({"host": "h2", "accelerator": "kvm",
                                    "qemu_version": "7.2.22",
                                    "free_memory_bytes": 16 * GiB})
    reasons = check(old)
    assert "host h2 did not publish its CPU models (older parvisor?)" in reasons[1]
    assert len(reasons) == 4 and all("did not publish" in r for r in reasons)


def test_every_reason_is_reported_at_once() -> None:
    bad = replace(H2, accelerator="tcg", machine_types=(), cpu_models=(), switches=(),
                  shared_storage=None, storage_roots=(), free_memory_bytes=0)
    assert len(check(bad)) == 6 + len(DISKS) - 1     # one reason per disk


# --- the cluster CPU baseline ------------------------------------------------------------
def test_baseline_is_the_most_capable_model_every_host_runs() -> None:
    hosts = {"h1": H1.cpu_models, "h2": ("Skylake-Server", "Westmere", "qemu64")}
    assert choose_cpu_baseline(hosts, list(DEFAULT_CPU_BASELINES)) == "Skylake-Server"
    mixed = {**hosts, "h3": ("EPYC", "Westmere", "qemu64")}
    assert choose_cpu_baseline(mixed) == "Westmere"
    assert choose_cpu_baseline({"h1": ("max",), "h2": ("qemu64",)}) is None
    assert choose_cpu_baseline({}) is None
    assert choose_cpu_baseline(hosts, ["qemu64", "Westmere"]) == "qemu64"   # order wins


def test_default_baselines_end_with_the_model_every_x86_qemu_runs() -> None:
    assert DEFAULT_CPU_BASELINES[-1] == "qemu64"
    assert len(set(DEFAULT_CPU_BASELINES)) == len(DEFAULT_CPU_BASELINES)


@pytest.mark.parametrize("name", ["Skylake-Server,+avx", "", "a b"])
def test_baseline_must_be_a_plain_model_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a QEMU CPU model name"):
        check(baseline=name)


def test_compat_is_pure() -> None:
    tree = ast.parse(inspect.getsource(compat))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert not imported & {"time", "datetime", "random", "os", "socket", "subprocess"}
