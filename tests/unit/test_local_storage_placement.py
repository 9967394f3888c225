"""VMs whose disks are on one host's local storage (``diskhost/<uuid>``): placed on that
host only (also in a cluster without shared storage), never failed over without a
replica, and a refusal names the host that holds the disks (pure decisions)."""

from __future__ import annotations

from parvisor.cluster.decide import decide
from parvisor.cluster.model import (ClusterPolicy, ClusterView, HostView, MarkError, Owner,
                                    PlaceVm, VmPhase, VmView)
from parvisor.cluster.placement import Usage, choose_host, refusal

GIB = 1 << 30


def host(name, member=True, shared=False, **kw) -> HostView:
    return HostView(name=name, member=member, memory_bytes=8 * GIB, cpus=4,
                    shared_storage=shared, **kw)


def local_vm(disk_host, owner=None, phase=VmPhase.STOPPED, **kw) -> VmView:
    return VmView(uuid="u-db", name="db", memory_bytes=GIB, vcpus=1, desired_running=True,
                  owner=Owner(owner, revision=7 if owner else 0), phase=phase, ha=True,
                  on_shared_storage=False, disk_host=disk_host, **kw)


def view(hosts, vms, now=100.0) -> ClusterView:
    return ClusterView(now, ClusterPolicy(), tuple(hosts), tuple(vms))


def test_without_shared_storage_a_local_vm_starts_on_its_disk_host_only():
    hosts = [host("h1"), host("h2"), host("h3")]
    v = view(hosts, [local_vm("h2")])
    assert decide(v) == [PlaceVm("u-db", "db", "h2", None, 0, "start")]
    vm, usage = v.vms[0], Usage.of(v)
    assert refusal(hosts[0], vm, v, usage) == "disks on local storage of h2"
    assert refusal(hosts[1], vm, v, usage) is None


def test_preferred_hosts_and_free_memory_do_not_move_it_off_its_disks():
    hosts = [host("h1", shared=True), host("h2")]
    v = view(hosts, [local_vm("h2", preferred_hosts=("h1",))])
    assert choose_host(v.vms[0], v, Usage.of(v)) == "h2"


def test_its_disk_host_down_it_waits_saying_why():
    v = view([host("h1"), host("h2", member=False)], [local_vm("h2")])
    [error] = decide(v)
    assert isinstance(error, MarkError) and error.retryable
    assert error.reason == "start: disks on local storage of h2: not a member"


def test_its_disk_host_short_of_memory_it_waits_saying_why():
    other = VmView(uuid="u-big", name="big", memory_bytes=8 * GIB, vcpus=1,
                   desired_running=True, owner=Owner("h2", revision=3),
                   phase=VmPhase.RUNNING)
    [error] = decide(view([host("h1"), host("h2")], [other, local_vm("h2")]))
    assert error.reason == "start: disks on local storage of h2: not enough memory"


def test_a_failed_disk_host_leaves_it_not_protected_waiting_for_the_host():
    hosts = [host("h1"), host("h2", member=False, lost_seen_at=90.0, fenced=True)]
    [error] = decide(view(hosts, [local_vm("h2", owner="h2", phase=VmPhase.RUNNING)]))
    assert error.retryable
    assert error.reason == "host h2 failed; disks on local storage: not protected"


def test_maintenance_on_its_disk_host_keeps_it_running_there():
    hosts = [host("h1"), host("h2", maintenance=True)]
    assert decide(view(hosts, [local_vm("h2", owner="h2", phase=VmPhase.RUNNING)])) == []


def test_without_a_known_disk_host_local_disks_are_refused_everywhere_as_before():
    hosts = [host("h1", shared=True), host("h2", shared=True)]
    v = view(hosts, [local_vm(None)])
    assert refusal(hosts[0], v.vms[0], v, Usage.of(v)) == "disks on local storage"
    [error] = decide(v)
    assert isinstance(error, MarkError) and "no host can take it" in error.reason


def test_shared_storage_vms_ignore_a_stale_disk_host():
    """on_shared_storage True wins: the key only matters for local disks."""
    hosts = [host("h1", shared=True), host("h2", shared=True)]
    vm = VmView(uuid="u-a", name="a", memory_bytes=GIB, vcpus=1, desired_running=True,
                owner=Owner(None), phase=VmPhase.STOPPED, disk_host="h2",
                preferred_hosts=("h1",))
    assert decide(view(hosts, [vm]))[0].host == "h1"
