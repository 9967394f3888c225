"""A hot-plug that QEMU refuses leaves the definition unchanged (fake QMP server)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace
from typing import Any

import pytest

from parvisor.errors import QmpError
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition
from parvisor.ops.hotplug import HotplugManager
from parvisor.ops.requests import EditVm
from parvisor.ops.runtime import VmRuntime
from parvisor.qmp.client import QmpConnection
from parvisor.store.sqlite import SqliteStore
from parvisor.testing.fake_qmp import FakeQmpCommandError, FakeQmpServer
from parvisor.testing.guest_fixtures import short_state_dir
from parvisor.vm.cgroups import CgroupHost

KERNEL = {"kind": "kernel", "kernel": "/k"}


class FakeVms:
    """The slice of VmManager that HotplugManager uses."""

    def __init__(self, store: SqliteStore, process: Any) -> None:
        self.store, self.events = store, []
        self.accelerator = SimpleNamespace(accelerator="tcg")
        self.runtimes: dict[str, VmRuntime] = {}
        self.process = process

    def runtime(self, vm_uuid: str) -> VmRuntime:
        runtime = self.runtimes.setdefault(vm_uuid, VmRuntime(vm_uuid))
        runtime.process = self.process
        return runtime

    def event(self, kind: str, message: str, record: Any = None, **details: Any) -> None:
        self.events.append((kind, message))

    def show(self, name: str) -> Any:
        return self.store.get_vm(name)


class FakeProcess:
    def __init__(self, qmp: QmpConnection) -> None:
        self.qmp, self.pid = qmp, 0


def hotpluggable(plugged: int, total: int = 4) -> list[dict]:
    return [{"type": "max-x86_64-cpu", "vcpus-count": 1,
             "props": {"socket-id": 0, "core-id": c, "thread-id": 0},
             **({"qom-path": f"/machine/unattached/device[{c}]"} if c < plugged else {})}
            for c in range(total)]


@pytest.fixture
async def setup():
    directory = short_state_dir("pvhp-")
    store = SqliteStore(directory / "db.sqlite")
    async with FakeQmpServer(directory / "qmp.sock") as server:
        qmp = QmpConnection(server.socket_path)
        await qmp.connect(timeout=5)
        vms = FakeVms(store, FakeProcess(qmp))
        record = store.create_vm(VmDefinition(name="a", boot=KERNEL, vcpus=1))
        store.set_state(record.uuid, VmState.STARTING)
        store.set_state(record.uuid, VmState.RUNNING)
        yield server, vms, HotplugManager(vms, cgroups=CgroupHost(None))
        await qmp.disconnect()
    store.close()
    shutil.rmtree(directory, ignore_errors=True)


async def test_refused_device_add_leaves_the_definition_unchanged(setup):
    server, vms, hotplug = setup
    server.handlers["query-hotpluggable-cpus"] = lambda args: hotpluggable(1)

    def refuse(args: dict) -> None:
        raise FakeQmpCommandError("CPU hot-plug not supported (injected)")
    server.handlers["device_add"] = refuse
    before = vms.store.get_vm("a")
    with pytest.raises(QmpError, match="injected"):
        await hotplug.edit("a", EditVm(vcpus=3))
    after = vms.store.get_vm("a")
    assert after.definition == before.definition and after.generation == before.generation
    assert "device_add" in server.executed()


async def test_confirmed_cpu_add_is_written_to_the_definition(setup):
    server, vms, hotplug = setup
    plugged = {"n": 1}
    server.handlers["query-hotpluggable-cpus"] = lambda args: hotpluggable(plugged["n"])
    server.handlers["device_add"] = lambda args: plugged.update(n=plugged["n"] + 1)
    await hotplug.edit("a", EditVm(vcpus=3))
    assert vms.store.get_vm("a").definition.vcpus == 3
    assert any(kind == "hot-plug" for kind, _ in vms.events)


async def test_second_cpu_failing_records_the_first(setup):
    server, vms, hotplug = setup
    plugged = {"n": 1}
    server.handlers["query-hotpluggable-cpus"] = lambda args: hotpluggable(plugged["n"])

    def once(args: dict) -> None:
        if plugged["n"] == 2:
            raise FakeQmpCommandError("no more (injected)")
        plugged["n"] += 1
    server.handlers["device_add"] = once
    with pytest.raises(QmpError):
        await hotplug.edit("a", EditVm(vcpus=3))
    assert vms.store.get_vm("a").definition.vcpus == 2     # what QEMU really has
