"""Scenario tests: each folder here is one cluster story run through the simulator.

A folder holds README.md (what it shows), initial.json (hosts, etcd members, VMs),
events.txt (the fault script), expected.log (the golden log) and outcome.json (the end
state the story must reach). The simulator checks INV-1/2/3/5/6 at every step, so a
golden log can never bless a violation. ``PARVISOR_REWRITE_GOLDEN=1`` rewrites the
logs (review the diff!); a missing golden fails.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path

import pytest

from parvisor.cluster.model import VmPhase
from parvisor.testing.cluster_sim import Simulation, build_simulation, parse_events

HERE = Path(__file__).parent
SCENARIOS = sorted(p for p in HERE.iterdir() if (p / "events.txt").exists())
REWRITE = os.environ.get("PARVISOR_REWRITE_GOLDEN") == "1"
REQUIRED = ("README.md", "initial.json", "events.txt", "outcome.json")


def run_scenario(folder: Path) -> Simulation:
    sim = build_simulation(json.loads((folder / "initial.json").read_text()))
    events, until = parse_events((folder / "events.txt").read_text())
    sim.run(events, until)
    return sim


def check_golden(folder: Path, log: str) -> None:
    golden = folder / "expected.log"
    if REWRITE:
        golden.write_text(log)
        return
    if not golden.exists():
        pytest.fail(f"{golden} is missing; run with PARVISOR_REWRITE_GOLDEN=1 and review")
    expected = golden.read_text()
    if log != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), log.splitlines(True),
                                            "expected.log", "actual"))
        pytest.fail(f"log differs from the golden:\n{diff}")


def check_outcome(sim: Simulation, outcome: dict) -> None:
    by_name = {vm.name: uuid for uuid, vm in sim.vms.items()}
    for name, want in sorted(outcome.get("vms", {}).items()):
        uuid = by_name[name]
        where = sim.where(uuid)
        assert where == ([want["on"]] if want["on"] else []), f"{name} runs on {where}"
        if "starts" in want:
            assert sim.starts[uuid] == want["starts"], f"{name} started {sim.starts[uuid]}x"
        status = sim.etcd.kv.get(f"status/{uuid}")
        if "error" in want:
            assert status and status.value.phase == VmPhase.ERROR, f"{name}: no error"
            assert want["error"] in status.value.reason, status.value.reason
        elif want["on"]:
            assert status and status.value.phase == VmPhase.RUNNING, f"{name}: {status}"
    if "fenced_hosts" in outcome:
        assert sorted(sim.fenced_by) == outcome["fenced_hosts"]
    if "manager" in outcome:
        assert sim.etcd.kv["manager"].value == outcome["manager"]


@pytest.mark.parametrize("folder", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_scenario(folder: Path) -> None:
    for name in REQUIRED:
        assert (folder / name).exists(), f"{folder.name}: {name} missing"
    started = time.monotonic()
    sim = run_scenario(folder)
    assert time.monotonic() - started < 5.0, "a scenario must run in seconds"
    check_golden(folder, "\n".join(sim.lines) + "\n")
    check_outcome(sim, json.loads((folder / "outcome.json").read_text()))


def test_scenarios_exist() -> None:
    names = {p.name for p in SCENARIOS}
    assert len(names) >= 13, names
