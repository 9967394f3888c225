"""MigrationFacts (what a host publishes for migration) and the QEMU capability probe.

The probe runs the real QEMU once (cached per process); the CPU-baseline test starts a
paused q35 with the exact ``-cpu`` argument our argv builder writes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput, QmpError, VmError
from parvisor.hypervisor import facts as facts_mod
from parvisor.hypervisor.facts import (MigrationFacts, gather_migration_facts, parse_capabilities,
                                       probe_qemu_capabilities, run_qmp_probe)
from parvisor.model.vm import VmDefinition
from parvisor.vm.firmware import cpu_model

QEMU = "qemu-system-x86_64"
FULL = MigrationFacts(
    host="h1", accelerator="tcg", qemu_version="7.2.22", host_cpu_model="Xeon X",
    machine_types=("pc-i440fx-7.2", "pc-q35-7.1", "pc-q35-7.2"),
    machine_aliases=(("pc", "pc-i440fx-7.2"), ("q35", "pc-q35-7.2")),
    cpu_models=("max", "qemu64"), switches=("external",), storage_roots=("/srv/a",),
    shared_storage="/srv/shared", free_memory_bytes=8 << 30, migration_address="10.0.0.1")


# --- the real probe ------------------------------------------------------------------
def test_probe_under_tcg_resolves_q35_and_lists_runnable_cpu_models() -> None:
    caps = probe_qemu_capabilities(QEMU, "tcg")
    aliases = dict(caps.machine_aliases)
    assert aliases["q35"].startswith("pc-q35-") and aliases["q35"] in caps.machine_types
    assert aliases["pc"].startswith("pc-i440fx-")
    assert {"qemu64", "max"} <= set(caps.cpu_models)
    # host needs KVM; Skylake-Server has features TCG does not emulate (x2apic, avx512)
    assert "host" not in caps.cpu_models and "Skylake-Server" not in caps.cpu_models
    assert probe_qemu_capabilities(QEMU, "tcg") is caps          # cached per process


def _start_and_quit(cpu: str) -> subprocess.CompletedProcess[str]:
    # -machine none creates no x86 CPU; a paused q35 creates it and never runs a guest
    argv = [QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", cpu, "-S", "-m", "64",
            "-nodefaults", "-no-user-config", "-display", "none", "-qmp", "stdio"]
    script = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)


def test_baseline_cpu_argument_is_accepted_by_qemu_and_enforced() -> None:
    vm = VmDefinition.model_validate({"name": "a", "boot": {"kind": "disk"}})
    ok = _start_and_quit(cpu_model(vm, "tcg", "qemu64"))
    assert ok.returncode == 0, ok.stderr
    # enforce: a model this host cannot fully run is refused, not silently shrunk
    refused = _start_and_quit(cpu_model(vm, "tcg", "Skylake-Server"))
    assert refused.returncode != 0 and "doesn't support requested features" in refused.stderr


def test_probe_errors_are_vm_errors(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="cannot run"):
        run_qmp_probe(str(tmp_path / "no-qemu"), "tcg", ("query-machines",))
    with pytest.raises(VmError, match="exited 1 without answering query-machines"):
        run_qmp_probe("false", "tcg", ("query-machines",))
    slow = tmp_path / "slow-qemu"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(VmError, match="took over"):
        run_qmp_probe(str(slow), "tcg", ("query-machines",), timeout_s=0.3)
    with pytest.raises(InvalidInput):
        probe_qemu_capabilities(QEMU, "xen")


def test_qmp_error_reply_is_a_qmp_error() -> None:
    out = '{"QMP": {}}\n{"return": {}, "id": "caps"}\n' \
          '{"error": {"class": "GenericError", "desc": "nope"}, "id": "query-machines"}\n'
    done = subprocess.CompletedProcess([QEMU], 0, stdout=out, stderr="")
    with pytest.raises(QmpError, match="query-machines failed: nope"):
        facts_mod._replies(done, [QEMU], ("query-machines",))


def test_parse_keeps_only_fully_runnable_cpu_models() -> None:
    caps = parse_capabilities(
        [{"name": "pc-q35-7.2", "alias": "q35"}, {"name": "pc-q35-7.1"}, {"name": "none"}],
        [{"name": "qemu64", "unavailable-features": []},
         {"name": "Skylake-Server", "unavailable-features": ["avx512f"]},
         {"name": "mystery"}])       # no list: unknown, not runnable
    assert caps.machine_types == ("none", "pc-q35-7.1", "pc-q35-7.2")
    assert caps.machine_aliases == (("q35", "pc-q35-7.2"),)
    assert caps.cpu_models == ("qemu64",)


def test_gather_local_facts_is_json_safe() -> None:
    facts = gather_migration_facts("h1", switches=["b", "a"], storage_roots=["/srv/a"],
                                   shared_storage=None, migration_address="10.0.0.1")
    assert facts.accelerator in ("kvm", "tcg") and facts.cpu_models
    assert facts.switches == ("a", "b") and facts.resolve_machine("q35")
    assert MigrationFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


# --- the published document ------------------------------------------------------------
def test_round_trip_through_json() -> None:
    data = json.loads(json.dumps(FULL.to_dict()))
    assert data["machine_aliases"] == {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}
    back = MigrationFacts.from_dict(data)
    assert back == FULL and back.missing == frozenset()


def test_older_hosts_document_records_what_it_lacks() -> None:
    old = MigrationFacts.from_dict({"host": "h2", "accelerator": "kvm",
                                    "free_memory_bytes": 1 << 30, "future_key": 1})
    assert old.cpu_models == () and "cpu_models" in old.missing
    assert "accelerator" not in old.missing and "host" not in old.missing
    assert "cpu_models" not in old.to_dict()          # still unpublished after a round trip
    assert MigrationFacts.from_dict(old.to_dict()).missing == old.missing


def test_unreadable_document_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="h2 published unreadable"):
        MigrationFacts.from_dict({"host": "h2", "cpu_models": "qemu64"})
    with pytest.raises(InvalidInput, match="h2 published unreadable"):
        MigrationFacts.from_dict({"host": "h2", "free_memory_bytes": "lots"})
    with pytest.raises(InvalidInput):
        MigrationFacts.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


def test_resolve_machine_by_alias_or_versioned_name() -> None:
    assert FULL.resolve_machine("q35") == "pc-q35-7.2"
    assert FULL.resolve_machine("pc-q35-7.1") == "pc-q35-7.1"
    assert FULL.resolve_machine("pc-q35-9.0") is None
