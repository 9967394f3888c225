"""Self-fence deadline arithmetic and the agent's fencing against a simulated world."""

from __future__ import annotations

import pytest

from parvisor.cluster.env import VmStatus
from parvisor.cluster.fencing import (LocalVm, fence_deadline, must_fence, orphans,
                                      to_kill_at_deadline)
from parvisor.cluster.model import VmPhase
from parvisor.errors import InvalidInput
from parvisor.testing.cluster_sim import build_simulation, parse_events

INITIAL = {"etcd": [{"name": "e1"}, {"name": "e2"}, {"name": "e3"}],
           "hosts": [{"name": "h1"}, {"name": "h2"}],
           "vms": [{"name": "a", "host": "h2", "ha": True},
                   {"name": "b", "host": "h2", "ha": False}]}


def test_deadline_counts_from_the_send():
    assert fence_deadline(100.0, 8.0, 2.5) == 105.5
    assert not must_fence(105.4, 100.0, 8.0, 2.5)
    assert must_fence(105.5, 100.0, 8.0, 2.5)
    assert must_fence(0.0, None, 8.0, 2.5)       # never renewed: nothing may run


@pytest.mark.parametrize("margin", [0.0, -1.0, 8.0, 9.0])
def test_margin_must_fit_inside_the_ttl(margin):
    with pytest.raises(InvalidInput):
        fence_deadline(0.0, 8.0, margin)


def test_only_ha_vms_are_fenced_and_unknown_ownership_never_kills():
    vms = [LocalVm("b", True), LocalVm("a", False), LocalVm("c", True, owned_here=None),
           LocalVm("d", False, owned_here=False)]
    assert [v.uuid for v in to_kill_at_deadline(vms)] == ["b", "c"]
    assert [v.uuid for v in orphans(vms)] == ["d"]


def test_isolated_host_fences_strictly_before_its_lease_expires():
    sim = build_simulation(INITIAL)
    events, until = parse_events("t=5 isolate h2\nt=30 end\n")
    sim.run(events, until)
    fence = next(l for l in sim.lines if "self-fence" in l)
    expiry = next(l for l in sim.lines if "lease 1002 of h2 expired" in l)
    fence_t, expiry_t = (float(l[2:].split()[0]) for l in (fence, expiry))
    policy = sim.policy
    assert expiry_t - fence_t >= policy.fence_margin_s - policy.keepalive_interval_s
    assert sim.where("b-uuid") == ["h2"]         # the non-HA VM was left alone


def test_a_woken_agents_stale_status_write_is_rejected():
    sim = build_simulation(INITIAL)
    env = sim.hosts["h2"].agent.env
    stale = env.read().owners["a-uuid"].revision
    sim.run(*parse_events("t=5 freeze h2\nt=30 thaw h2\nt=31 end\n"))
    assert sim.where("a-uuid") == ["h1"]
    assert not env.write_status("a-uuid", VmStatus(VmPhase.RUNNING, stale))
