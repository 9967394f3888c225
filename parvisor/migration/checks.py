"""Glue between the migration protocol and the pure compatibility checks: gather this
host's ``MigrationFacts`` (published in its cluster registration) and, on the source,
every reason a requested move must be refused before anything moves.

Why the destination is read from etcd: the source decides alone, from what the
destination published when it joined; the destination re-checks what changes quickly
(free memory) itself when it prepares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parvisor.hypervisor.facts import MigrationFacts, gather_migration_facts
from parvisor.migration.compat import check_migration
from parvisor.storage.chains import walk_chain


def local_facts(config: Any, settings: Any, store: Any) -> dict[str, Any]:
    """This host's facts as published in ``hosts/<name>`` and ``members/<name>``."""
    try:
        switches = [s["name"] for s in store.list_switches()]
    except Exception:     # noqa: BLE001 - etcd not up yet: publish without switches
        switches = []
    facts = gather_migration_facts(
        settings.host, switches=switches,
        storage_roots=[str(r) for r in config.storage_roots],
        shared_storage=str(settings.shared_storage) if settings.shared_storage else None,
        migration_address=settings.migration_ip())
    return facts.to_dict()


def host_facts(coordinator: Any, host: str) -> MigrationFacts:
    item = coordinator.kv.get(coordinator.keys.host(host))
    doc = json.loads(item.value) if item is not None else {}
    return MigrationFacts.from_dict({"host": host, **doc.get("migration", {})})


def refusals(coordinator: Any, vm: Any, record: Any) -> list[str]:
    """Every reason ``vm`` must not move as ``record`` asks; [] means go."""
    vms = coordinator.vms
    source = host_facts(coordinator, record.source)
    dest = host_facts(coordinator, record.destination)
    runtime = vms.runtimes.get(vm.uuid)
    memory = (runtime.memory_current_bytes if runtime and runtime.memory_current_bytes
              else vm.definition.memory_bytes)
    return shared_disk_refusals(vm.definition, record.options.with_storage) + check_migration(
        vm.definition, vm_memory_bytes=memory, source=source, dest=dest,
        dest_name=record.destination, cpu_baseline=running_cpu_model(runtime),
        with_storage=record.options.with_storage,
        disk_paths=_disk_files(vm.definition, vms.config.storage_roots))


def shared_disk_refusals(definition: Any, with_storage: bool) -> list[str]:
    """Shared-nothing migration copies disks to the destination: a shared disk copied
    while the guest cluster's other VMs write it would fork it in two. Live and quick
    migration keep it where it is (shared storage) and are fine."""
    shared = [d.id for d in definition.disks if d.shared]
    if with_storage and shared:
        return [f"shared disk(s) {', '.join(shared)} (guest clustering) cannot move with "
                "--with-storage: the other VMs keep writing them; migrate without "
                "--with-storage (they are on shared storage)"]
    return []


def source_machine_type(coordinator: Any, vm: Any) -> str | None:
    """The versioned machine type the VM runs with here (from this host's facts)."""
    from parvisor.migration.compat import migration_machine_type
    return migration_machine_type(vm.definition, host_facts(coordinator, coordinator.host))


def running_cpu_model(runtime: Any) -> str | None:
    """The ``-cpu`` model the running QEMU was started with, when it is a named
    baseline (``host``/``max`` pass the host CPU through: None)."""
    process = runtime.process if runtime is not None else None
    if process is None:
        return None
    argv = process.argv
    if argv is None:
        try:
            argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            return None
    for flag, value in zip(argv, argv[1:]):
        if flag == "-cpu":
            model = value.split(",", 1)[0]
            return None if model in ("host", "max") else model
    return None


def _disk_files(definition: Any, roots: Any) -> list[str]:
    files: list[str] = []
    for disk in definition.disks:
        if not disk.path:
            continue
        try:
            files += [str(link.path) for link in walk_chain(Path(disk.path), disk.format,
                                                            roots)]
        except Exception:  # noqa: BLE001 - an unreadable chain fails at launch, clearly
            files.append(disk.path)
    return files
