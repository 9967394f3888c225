"""Test failover (parvisor.replication.test_failover) without machines: when a test copy
may be taken and where, what the test VM looks like, and the order of effects against
a fake replica target (QMP) and a fake cluster VM manager: copies taken by the target
while the coordinator leaves the record alone, a private switch and a non-HA VM on the
copies; a second ``--test`` refused; ``--test-stop`` removes all of it; a failed copy
leaves nothing behind. The real run (qemu-storage-daemon, QEMU, etcd) is the slow lab
test in tests/integration/test_replication_lab.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from parvisor.errors import AlreadyExists, NotFound, ReplicationFailed, StateError
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition
from parvisor.replication import test_failover as tf
from parvisor.replication.protocol import Mode, ReplicationRecord, State
from parvisor.replication.target import IMAGE_NODE

UUID = "7c1a0c5e-8d43-4b1e-9c55-0a4c3c0e1f00"
NOW = 1_800_000_000.0


def record(state: State = State.IN_SYNC, mode: Mode = Mode.SYNC, **changes) -> ReplicationRecord:
    return replace(ReplicationRecord(
        vm_uuid=UUID, vm_name="web", mode=mode, primary="h1", replica="h2", state=state,
        images={"h1": {"disk0": "/l1/web/disk0.qcow2", "data": "/l1/web/data.qcow2"},
                "h2": {"disk0": "/r/disk0.qcow2", "data": "/r/data.qcow2"}},
        disk_sizes={"disk0": 1 << 20, "data": 1 << 20}), **changes)


def definition(boot: dict | None = None) -> VmDefinition:
    return VmDefinition.model_validate({
        "name": "web", "uuid": UUID, "vcpus": 2, "memory_bytes": 128 << 20,
        "boot": boot or {"kind": "kernel", "kernel": "/k/vmlinuz", "initrd": "/k/initrd",
                         "cmdline": "console=ttyS0 quiet"},
        "disks": [{"id": "disk0", "path": "/l1/web/disk0.qcow2"},
                  {"id": "cd", "path": None, "media": "cdrom", "bus": "ide"},
                  {"id": "data", "path": "/l1/web/data.qcow2", "bus": "virtio-scsi"}],
        "nics": [{"id": "nic0", "switch": "lan", "mac": "52:54:00:00:00:01"},
                 {"id": "nic1", "switch": "dmz", "mac": "52:54:00:00:00:02", "vlan": 7,
                  "model": "e1000"}],
        "ha": True})


# --- when and where (pure) ---------------------------------------------------------------
def test_only_the_replica_host_with_a_consistent_copy_takes_a_test_copy():
    tf.check_testable(record(), "h2", "web")
    with pytest.raises(NotFound, match="not replicated"):
        tf.check_testable(None, "h2", "web")
    with pytest.raises(tf.TestCopyRefused, match="replica host h2; h1 is its primary") as exc:
        tf.check_testable(record(), "h1", "web")
    assert exc.value.http_status == 409
    for state in (State.INITIAL_SYNC, State.RESYNCING, State.FAILED_OVER, State.DISABLING):
        with pytest.raises(StateError, match=f"it is {state.value}"):
            tf.check_testable(record(state, last_consistent_at=NOW), "h2", "web")
    with pytest.raises(StateError, match="it is broken"):
        tf.check_testable(record(State.BROKEN), "h2", "web")     # broke mid-resync
    tf.check_testable(record(State.BROKEN, last_consistent_at=NOW), "h2", "web")


def test_async_needs_a_committed_cycle_in_any_copying_state():
    for state in (State.IN_SYNC, State.LAGGING, State.BROKEN, State.RESYNCING):
        tf.check_testable(record(state, Mode.ASYNC, last_consistent_at=NOW), "h2", "web")
    with pytest.raises(StateError, match="it is lagging"):
        tf.check_testable(record(State.LAGGING, Mode.ASYNC), "h2", "web")
    with pytest.raises(StateError, match="it is initial-sync"):
        tf.check_testable(record(State.INITIAL_SYNC, Mode.ASYNC), "h2", "web")


def test_the_point_shown_is_the_copy_time_for_sync_and_the_last_cycle_for_async():
    assert "every write acknowledged" in tf.copy_point(record(), NOW)
    old = record(State.LAGGING, Mode.ASYNC, last_consistent_at=NOW - 300)
    assert tf.copy_point(old, NOW) == "2027-01-15T07:55:00Z"


# --- the test VM (pure) -----------------------------------------------------------------
def test_the_test_vm_boots_like_the_source_from_the_copies_on_the_test_switch_only():
    copies = {"disk0": Path("/r/web/test-disk0.qcow2"), "data": Path("/r/web/test-data.qcow2")}
    request = tf.test_vm_request(definition(), "web", copies, "web-test", None, "a note")
    assert request.name == "web-test" and request.ha is False and request.notes == "a note"
    assert (request.vcpus, request.memory, request.generation) == (2, 128 << 20, 1)
    assert (request.kernel, request.initrd, request.cmdline) == \
        ("/k/vmlinuz", "/k/initrd", "console=ttyS0 quiet")
    # the copies in the source's order, same bus; the CD drive is not replicated
    assert [(d.path, d.bus, d.format) for d in request.disks] == [
        ("/r/web/test-disk0.qcow2", "virtio-blk", "qcow2"),
        ("/r/web/test-data.qcow2", "virtio-scsi", "qcow2")]
    # every NIC isolated, with fresh MACs (the originals are the running VM's)
    assert [(n.switch, n.vlan, n.model, n.mac) for n in request.nics] == [
        ("web-test", None, "virtio", None), ("web-test", 7, "e1000", None)]


def test_the_tiny_kernel_is_this_hosts_and_disk_boot_stays_disk_boot(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_text("k")
    tiny = definition({"kind": "kernel", "kernel": str(kernel), "cmdline": "console=hvc0"})
    assert tf.boot_fields(tiny, kernel) == {"image": "tiny", "cmdline": "console=hvc0"}
    assert tf.boot_fields(tiny, tmp_path / "other") == \
        {"kernel": str(kernel), "initrd": None, "cmdline": "console=hvc0"}
    assert tf.boot_fields(definition({"kind": "disk"}), kernel) == {}


def test_names_fit_the_switch_rules():
    assert tf.test_switch_name("web") == "web-test" == tf.test_vm_name("web")
    assert tf.test_switch_name("db.prod") == "db_prod-test"
    assert len(tf.test_switch_name("x" * 60)) == 32
    add, backup, node, job = tf.backup_commands("disk0", Path("/r/test-disk0.qcow2"))
    assert backup["device"] == IMAGE_NODE and backup["target"] == node == add["node-name"]
    assert backup["sync"] == "full" and backup["job-id"] == job


# --- effects against fakes ----------------------------------------------------------------
class FakeTarget:
    """A replica target's QMP: a backup job that concludes (with ``error``, if set)."""

    def __init__(self, image: Path, coordinator: "FakeCoordinator") -> None:
        self.spec = SimpleNamespace(image=image, format="qcow2")
        self.exited = False
        self.calls: list[tuple[str, dict | None]] = []
        self.jobs: dict[str, dict] = {}
        self.error: str | None = None
        self.coordinator = coordinator

    async def execute(self, command: str, args: dict | None = None):
        self.calls.append((command, args))
        if command == "blockdev-backup":
            assert UUID in self.coordinator.planned      # the record is left alone
            job = {"id": args["job-id"], "status": "concluded"}
            self.jobs[args["job-id"]] = {**job, **({"error": self.error} if self.error
                                                   else {})}
        if command == "query-jobs":
            return list(self.jobs.values())
        if command == "job-dismiss":
            self.jobs.pop(args["id"])
        return {}


class FakeVms:
    def __init__(self, tmp_path: Path) -> None:
        self.vms = {"web": SimpleNamespace(name="web", uuid=UUID, definition=definition(),
                                           state=VmState.RUNNING)}
        self.switch_defs: dict[str, object] = {}
        self.log: list[str] = []
        self.config = SimpleNamespace(state_dir=tmp_path / "state")
        self.store = SimpleNamespace(get_vm=self.get_vm)
        self.switches = SimpleNamespace(get=self._switch, create=self._create_switch,
                                        delete=self._delete_switch)

    def get_vm(self, name: str):
        if name not in self.vms:
            raise NotFound(f"no VM named '{name}'")
        return self.vms[name]

    def _switch(self, name: str):
        if name not in self.switch_defs:
            raise NotFound(f"no switch named '{name}'")
        return self.switch_defs[name]

    def _create_switch(self, defn) -> None:
        self.switch_defs[defn.name] = defn
        self.log.append(f"switch {defn.name} {defn.type}")

    def _delete_switch(self, name: str) -> None:
        del self.switch_defs[name]
        self.log.append(f"switch {name} deleted")

    def _qemu_user(self) -> None:
        return None

    def create(self, request) -> None:
        disks = tuple({"id": f"disk{i}", "path": d.path} for i, d in enumerate(request.disks))
        self.vms[request.name] = SimpleNamespace(
            name=request.name, uuid="0" * 8, state=VmState.OFF, request=request,
            definition=SimpleNamespace(disks=[SimpleNamespace(**d) for d in disks]))
        self.log.append(f"create {request.name}")

    async def start(self, name: str) -> None:
        self.vms[name].state = VmState.RUNNING
        self.log.append(f"start {name}")

    async def turn_off(self, name: str) -> None:
        self.vms[name].state = VmState.OFF
        self.log.append(f"off {name}")

    async def delete(self, name: str, force: bool = False) -> None:
        del self.vms[name]
        self.log.append(f"delete {name}")

    def event(self, kind: str, message: str, record=None) -> None:
        self.log.append(f"event {message}")


class FakeCoordinator:
    def __init__(self, tmp_path: Path, rec: ReplicationRecord | None = None) -> None:
        self.host, self.root = "h2", tmp_path / "replicas"
        self.vms = FakeVms(tmp_path)
        self.planned: set[str] = set()
        self.tasks: dict[str, asyncio.Task] = {}
        self.record = rec or record()
        self.targets = {d: FakeTarget(self.root / UUID / f"{d}.qcow2", self)
                        for d in ("disk0", "data")}
        self.replica = {UUID: SimpleNamespace(targets=self.targets)}

    def read(self, vm_uuid: str) -> ReplicationRecord | None:
        return self.record if vm_uuid == UUID else None


@pytest.fixture
def coordinator(tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "inspect_image",
                        lambda path, fmt: SimpleNamespace(virtual_size=1 << 20))

    def create_image(path, fmt, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{fmt} {size}")
    monkeypatch.setattr(tf, "create_image", create_image)
    return FakeCoordinator(tmp_path)


async def test_a_test_copy_is_a_private_switch_and_a_vm_on_point_in_time_copies(coordinator):
    answer = await tf.start_test_copy(coordinator, "web")
    vms = coordinator.vms
    assert answer["test_vm"] == "web-test" and answer["host"] == "h2"
    copies = {d: coordinator.root / "test-copies" / "web-test" / f"{d}.qcow2"
              for d in ("disk0", "data")}
    assert answer["disks"] == {d: str(p) for d, p in copies.items()}
    assert all(p.exists() for p in copies.values())
    for disk, target in coordinator.targets.items():
        assert [c for c, _ in target.calls] == ["blockdev-add", "blockdev-backup",
                                                "query-jobs", "job-dismiss", "blockdev-del"]
        assert target.calls[0][1]["file"]["filename"] == str(copies[disk])
    assert vms.log[:3] == ["switch web-test private", "create web-test", "start web-test"]
    request = vms.vms["web-test"].request
    assert [d.path for d in request.disks] == [str(copies["disk0"]), str(copies["data"])]
    assert not request.ha and "test failover copy of web" in request.notes
    assert coordinator.planned == set()
    assert vms.vms["web"].state == VmState.RUNNING          # the original is untouched


async def test_a_second_test_and_a_test_on_the_primary_are_refused_with_nothing_made(
        coordinator):
    await tf.start_test_copy(coordinator, "web")
    before = list(coordinator.vms.log)
    with pytest.raises(AlreadyExists, match="exists already"):
        await tf.start_test_copy(coordinator, "web")
    coordinator.host = "h1"
    with pytest.raises(tf.TestCopyRefused, match="its primary"):
        await tf.start_test_copy(coordinator, "web")
    assert coordinator.vms.log == before


async def test_test_stop_removes_vm_copies_and_switch_then_says_there_is_none(coordinator):
    answer = await tf.start_test_copy(coordinator, "web")
    vms = coordinator.vms
    stopped = await tf.stop_test_copy(coordinator, "web")
    assert stopped["removed"] == ["VM web-test", "switch web-test"]
    assert vms.log[4:7] == ["off web-test", "delete web-test", "switch web-test deleted"]
    assert not any(Path(p).exists() for p in answer["disks"].values())
    assert not (coordinator.root / "test-copies" / "web-test").exists()
    assert "web-test" not in vms.vms and vms.switch_defs == {}
    with pytest.raises(NotFound, match="no test failover copy"):
        await tf.stop_test_copy(coordinator, "web")


async def test_a_failed_copy_leaves_nothing_and_releases_the_record(coordinator):
    coordinator.targets["data"].error = "No space left on device"
    with pytest.raises(ReplicationFailed, match="No space left"):
        await tf.start_test_copy(coordinator, "web")
    assert not (coordinator.root / "test-copies" / "web-test").exists()
    assert coordinator.targets["data"].jobs == {}            # dismissed
    assert ("blockdev-del", {"node-name": "test-copy-data"}) in coordinator.targets["data"].calls
    assert coordinator.vms.log == [] and coordinator.planned == set()


async def test_the_copy_waits_for_the_coordinators_running_step(coordinator):
    order = []

    async def step():
        await asyncio.sleep(0.05)
        order.append("step done")
    coordinator.tasks[UUID] = asyncio.ensure_future(step())
    original = coordinator.targets["data"].execute

    async def execute(command, args=None):
        if command == "blockdev-backup":
            order.append("backup")
        return await original(command, args)
    coordinator.targets["data"].execute = execute
    await tf.start_test_copy(coordinator, "web")
    assert order == ["step done", "backup"]


async def test_no_targets_here_yet_is_a_clear_refusal(coordinator):
    coordinator.replica.clear()
    with pytest.raises(tf.TestCopyRefused, match="not running on h2"):
        await tf.start_test_copy(coordinator, "web")
    assert coordinator.vms.log == [] and coordinator.planned == set()
