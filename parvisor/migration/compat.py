"""Compatibility checks before anything moves, and the cluster CPU baseline.

Pure decisions: facts in (``MigrationFacts`` of both hosts, the VM, the cluster's CPU
baseline), reasons out. ``check_migration`` returns *every* reason a move must be
refused, each saying what is wrong and what to do, so a user fixes all of them at once;
an empty list means the move may start. Nothing here reads files, clocks or sockets.

Paths are compared as given: callers pass resolved paths (definitions store them so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from parvisor.hypervisor.facts import MigrationFacts
from parvisor.model.sizes import format_size
from parvisor.model.vm import VmDefinition
from parvisor.vm.firmware import cpu_model_name, machine_type

# QEMU's own memory on top of guest RAM (device state, TCG translation cache, I/O
# buffers): a fixed part plus a share of RAM (page tables, dirty bitmaps grow with it).
MEMORY_OVERHEAD_FIXED = 64 << 20
MEMORY_OVERHEAD_PCT = 2

# Named x86 models QEMU 7.2 knows, most capable first within each vendor. The -noTSX
# variants follow their model: many Intel hosts have TSX turned off by microcode, so
# only those run there. Intel before AMD is arbitrary (hosts of one vendor cannot run
# the other's modern models); a mixed cluster falls through to the old common models.
DEFAULT_CPU_BASELINES: tuple[str, ...] = (
    "Icelake-Server", "Icelake-Server-noTSX",
    "Cascadelake-Server", "Cascadelake-Server-noTSX",
    "Skylake-Server", "Skylake-Server-noTSX-IBRS",
    "Skylake-Client", "Skylake-Client-noTSX-IBRS",
    "Broadwell", "Broadwell-noTSX", "Haswell", "Haswell-noTSX",
    "IvyBridge", "SandyBridge", "Westmere", "Nehalem",
    "EPYC-Milan", "EPYC-Rome", "EPYC", "Opteron_G5", "Opteron_G4", "Opteron_G3",
    "Penryn", "Opteron_G2", "qemu64")

_FIELD_WHAT = {"accelerator": "accelerator", "machine_types": "QEMU machine types",
               "cpu_models": "CPU models", "qemu_version": "QEMU version",
               "host_cpu_model": "CPU model name", "switches": "virtual switches",
               "storage_roots": "storage roots", "free_memory_bytes": "free memory"}


@dataclass(frozen=True)
class _Move:
    vm: VmDefinition
    vm_memory_bytes: int
    source: MigrationFacts
    dest: MigrationFacts
    dest_name: str
    cpu_baseline: str | None
    with_storage: bool
    disk_paths: tuple[str, ...]

    @property
    def source_name(self) -> str:
        return self.source.host or "the source host"


def check_migration(vm: VmDefinition, *, vm_memory_bytes: int, source: MigrationFacts,
                    dest: MigrationFacts, dest_name: str, cpu_baseline: str | None,
                    with_storage: bool, disk_paths: list[str]) -> list[str]:
    """Every reason ``vm`` must not move from ``source`` to ``dest``; [] means go.

    ``vm_memory_bytes``: what the VM has now (dynamic memory / hot-add change it);
    ``cpu_baseline``: the baseline the running VM was *started* with (None: host/max);
    ``disk_paths``: every file the VM's disks use, backing files included.
    """
    move = _Move(vm, vm_memory_bytes, source, dest, dest_name, cpu_baseline,
                 with_storage, tuple(disk_paths))
    reasons: list[str] = []
    for check in (_accelerator, _machine, _cpu, _switches, _storage, _memory):
        reasons += check(move)
    return reasons


def unpublished(facts: MigrationFacts, name: str, key: str) -> str | None:
    """The refusal for a fact an older host did not publish, else None."""
    if key not in facts.missing:
        return None
    return (f"host {name} did not publish its {_FIELD_WHAT[key]} (older parvisor?): "
            f"upgrade parvisor on {name} before moving VMs there")


def _first_unpublished(move: _Move, *keys: str, source_too: bool = True) -> list[str]:
    hosts = [(move.dest, move.dest_name)]
    if source_too:
        hosts.append((move.source, move.source_name))
    for facts, name in hosts:
        for key in keys:
            reason = unpublished(facts, name, key)
            if reason:
                return [reason]
    return []


# --- one check per concern --------------------------------------------------------------
def _accelerator(move: _Move) -> list[str]:
    missing = _first_unpublished(move, "accelerator")
    if missing:
        return missing
    src, dst = move.source.accelerator, move.dest.accelerator
    if src == dst:
        return []
    return [f"{move.dest_name} runs {dst.upper()}, this VM runs under {src.upper()} on "
            f"{move.source_name}: QEMU cannot migrate between accelerators; pick a host "
            f"that runs {src.upper()}, or shut the VM down and start it on {move.dest_name}"]


def migration_machine_type(vm: VmDefinition, source: MigrationFacts) -> str | None:
    """The versioned machine type the VM runs with on ``source`` (``q35`` ->
    ``pc-q35-7.2``): the destination QEMU must be started with exactly this type."""
    return source.resolve_machine(machine_type(vm).split(",")[0])


def _machine(move: _Move) -> list[str]:
    missing = _first_unpublished(move, "machine_types")
    if missing:
        return missing
    alias = machine_type(move.vm).split(",")[0]
    resolved = migration_machine_type(move.vm, move.source)
    if resolved is None:
        return [f"{move.source_name} cannot say which QEMU machine type '{alias}' is "
                f"(not among its published machine types): re-probe QEMU on "
                f"{move.source_name} (restart its parvisor service)"]
    if resolved in move.dest.machine_types:
        return []
    src_qemu, dst_qemu = move.source.qemu_version or "?", move.dest.qemu_version or "?"
    return [f"{move.dest_name} (QEMU {dst_qemu}) lacks machine type {resolved}, which this "
            f"VM runs with on {move.source_name} (QEMU {src_qemu}): QEMU migrates only to "
            f"the same machine type; upgrade QEMU on {move.dest_name} to {src_qemu} or "
            f"newer, or pick another host"]


def _cpu(move: _Move) -> list[str]:
    accelerator = "kvm" if move.source.accelerator == "kvm" else "tcg"
    model = cpu_model_name(accelerator, move.cpu_baseline)
    if model in ("host", "max"):
        return _passthrough_cpu(move, model)
    missing = _first_unpublished(move, "cpu_models", source_too=False)
    if missing:
        return missing
    if model in move.dest.cpu_models:
        return []
    return [f"{move.dest_name} cannot run CPU model {model} that this VM uses (its CPU "
            f"or accelerator lacks features of that model): set a cluster CPU baseline "
            f"every host runs{_suggestion(move)} and restart the VM with it"]


def _passthrough_cpu(move: _Move, model: str) -> list[str]:
    """``host``/``max`` give the guest whatever this host has: it may only move to an
    identical one. TCG's ``max`` is what TCG emulates, so only QEMU's version decides;
    KVM's passes the real CPU through, so the CPU model must match as well."""
    src, dst = move.source, move.dest
    keys = ("qemu_version",) if src.accelerator == "tcg" else ("qemu_version", "host_cpu_model")
    missing = _first_unpublished(move, *keys)
    if missing:
        return missing
    differ = [key for key in keys if getattr(src, key) != getattr(dst, key)]
    if not differ:
        return []
    what = "; ".join(f"{_FIELD_WHAT[key]} {getattr(dst, key) or '?'} on {move.dest_name} vs "
                     f"{getattr(src, key) or '?'} on {move.source_name}" for key in differ)
    return [f"this VM uses the '{model}' CPU model (the CPU of the host it runs on, as is) "
            f"and the hosts differ ({what}): set a cluster CPU baseline{_suggestion(move)} "
            f"and restart the VM so it can move between different hosts"]


def _suggestion(move: _Move) -> str:
    baseline = choose_cpu_baseline({move.source_name: move.source.cpu_models,
                                    move.dest_name: move.dest.cpu_models})
    return f" (both hosts run {baseline})" if baseline else ""


def _switches(move: _Move) -> list[str]:
    wanted = {nic.switch: nic.id for nic in reversed(move.vm.nics)}   # first NIC per switch
    if not wanted:
        return []
    missing = _first_unpublished(move, "switches", source_too=False)
    if missing:
        return missing
    return [f"{move.dest_name} has no virtual switch '{switch}' (used by NIC {nic}): "
            f"create it on {move.dest_name} (same name, same network) or pick another host"
            for switch, nic in sorted(wanted.items()) if switch not in move.dest.switches]


def _storage(move: _Move) -> list[str]:
    missing = _first_unpublished(move, "storage_roots", source_too=False)
    if missing:
        return missing
    if move.with_storage:
        if move.dest.storage_roots:
            return []
        return [f"{move.dest_name} has no storage root to copy the disks into: configure "
                f"storage_roots on {move.dest_name}"]
    shared = move.dest.shared_storage
    return [f"disk {path} is not on the cluster shared storage {move.dest_name} sees "
            f"({shared or 'it has none'}): move the VM with its storage, or move the disk "
            f"to the shared storage first"
            for path in move.disk_paths if not _under(path, shared)]


def _under(path: str, shared: str | None) -> bool:
    """Only the shared storage counts: a local root with the same path on both hosts
    would give the destination a different file of the same name, or none."""
    pure = PurePosixPath(path)
    if shared is None or not pure.is_absolute() or ".." in pure.parts:
        return False      # unresolved paths: cannot say where they really are
    return pure.is_relative_to(shared)


def memory_needed(vm_memory_bytes: int) -> int:
    """Free memory the destination needs: guest RAM plus QEMU's overhead."""
    return vm_memory_bytes + MEMORY_OVERHEAD_FIXED + vm_memory_bytes * MEMORY_OVERHEAD_PCT // 100


def _memory(move: _Move) -> list[str]:
    missing = _first_unpublished(move, "free_memory_bytes", source_too=False)
    if missing:
        return missing
    need, free = memory_needed(move.vm_memory_bytes), move.dest.free_memory_bytes
    if free >= need:
        return []
    return [f"{move.dest_name} has {format_size(free)} free for VMs, this VM needs "
            f"{format_size(need)} ({format_size(move.vm_memory_bytes)} + "
            f"{format_size(MEMORY_OVERHEAD_FIXED)} + {MEMORY_OVERHEAD_PCT} % for QEMU): "
            f"free memory on {move.dest_name} or pick another host"]


# --- the cluster CPU baseline ----------------------------------------------------------
def choose_cpu_baseline(hosts_cpu_models: dict[str, tuple[str, ...]],
                        preferred: list[str] | tuple[str, ...] = DEFAULT_CPU_BASELINES,
                        ) -> str | None:
    """The first model of ``preferred`` every host runs; None when none is (or when
    there are no hosts: nothing to agree on)."""
    if not hosts_cpu_models:
        return None
    for model in preferred:
        if all(model in models for models in hosts_cpu_models.values()):
            return model
    return None
