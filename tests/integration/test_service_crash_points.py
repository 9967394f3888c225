"""SIGKILL of the real host service at injected points inside create and delete: after a
restart the store is consistent (the VM exists fully or not at all; no files of a
deleted VM remain; no QEMU without a record)."""

from __future__ import annotations

import pytest

from parvisor.testing.guest_fixtures import pid_alive
from parvisor.testing.host_fixture import wait_for


@pytest.mark.parametrize("point,exists_after", [("create.before_commit", False),
                                                ("create.after_commit", True)])
def test_crash_inside_create(stopped_host, point, exists_after):
    host = stopped_host
    host.start(crash_at=point)
    done = host.cli("vm", "create", "c1", "--image", "tiny", check=False)
    assert done.returncode == 1                       # the service died mid-request
    assert host.wait_service_exit() == -9
    host.start()
    names = [vm["name"] for vm in host.json("vm", "list")]
    assert names == (["c1"] if exists_after else [])
    if exists_after:
        assert host.state("c1") == "off"


@pytest.mark.qemu
@pytest.mark.parametrize("point,exists_after", [("delete.before_store", True),
                                                ("delete.before_commit", True),
                                                ("delete.after_commit", False),
                                                ("delete.before_files", False)])
def test_crash_inside_delete_of_a_running_vm(stopped_host, point, exists_after):
    host = stopped_host
    host.start(crash_at=point)
    host.create_tiny("d1")
    host.cli("vm", "start", "d1")
    vm_dir, pid = host.vm_dir("d1"), host.vm("d1")["pid"]
    assert host.cli("vm", "delete", "d1", "--force", check=False).returncode == 1
    assert host.wait_service_exit() == -9
    host.start()
    listed = [vm["name"] for vm in host.json("vm", "list")]
    assert listed == (["d1"] if exists_after else [])
    wait_for(lambda: not pid_alive(pid), 10, "the VM's QEMU to be gone")  # turned off first
    if exists_after:
        assert host.state("d1") in ("off", "crashed")
        host.cli("vm", "delete", "d1")                # and the delete can be finished
    assert not vm_dir.exists()
