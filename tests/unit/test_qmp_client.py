"""QmpConnection against the fake QMP server: typed replies, error mapping, events, fds."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from parvisor.errors import QmpError, VmError
from parvisor.qmp.client import MigrationInfo, QmpConnection, RunStatus
from parvisor.testing.fake_qmp import FakeQmpCommandError, FakeQmpServer, split_json_stream
from parvisor.testing.guest_fixtures import short_state_dir, wait_until


@pytest.fixture
def socket_dir() -> Any:
    directory = short_state_dir("pvq-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def server(socket_dir: Path) -> AsyncIterator[FakeQmpServer]:
    async with FakeQmpServer(socket_dir / "qmp.sock") as fake:
        yield fake


@pytest.fixture
async def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
async def qmp(server: FakeQmpServer,
              events: list[tuple[str, dict[str, Any]]]) -> AsyncIterator[QmpConnection]:
    connection = QmpConnection(server.socket_path,
                               on_event=lambda name, data: events.append((name, data)))
    await connection.connect(timeout=5)
    yield connection
    await connection.disconnect()


async def test_query_status_is_typed(qmp: QmpConnection, server: FakeQmpServer) -> None:
    assert await qmp.query_status() == RunStatus(status="running", running=True)
    await qmp.stop()
    assert await qmp.query_status() == RunStatus(status="paused", running=False)
    assert server.executed() == ["query-status", "stop", "query-status"]


async def test_events_reach_the_callback_in_order(
        qmp: QmpConnection, server: FakeQmpServer,
        events: list[tuple[str, dict[str, Any]]]) -> None:
    await qmp.stop()
    await qmp.cont()
    await server.emit("RTC_CHANGE", {"offset": 3, "qom-path": "/machine/unattached/device[8]"})
    await wait_until(lambda: len(events) == 3, 2, "three events")
    assert events == [("STOP", {}), ("RESUME", {}),
                      ("RTC_CHANGE", {"offset": 3, "qom-path": "/machine/unattached/device[8]"})]


async def test_a_failing_event_callback_does_not_break_the_session(server: FakeQmpServer) -> None:
    seen: list[str] = []

    def callback(name: str, data: dict[str, Any]) -> None:
        seen.append(name)
        raise RuntimeError("bug in a callback")

    connection = QmpConnection(server.socket_path, on_event=callback)
    await connection.connect()
    try:
        await server.emit("POWERDOWN")
        await wait_until(lambda: seen == ["POWERDOWN"], 2, "the event")
        assert (await connection.query_status()).running
    finally:
        await connection.disconnect()


async def test_qemu_error_becomes_qmp_error(qmp: QmpConnection, server: FakeQmpServer) -> None:
    def refuse(arguments: dict[str, Any]) -> None:
        raise FakeQmpCommandError("Device 'nic9' not found", "DeviceNotFound")

    server.handlers["device_del"] = refuse
    with pytest.raises(QmpError) as caught:
        await qmp.execute("device_del", {"id": "nic9"})
    error = caught.value
    assert error.details["command"] == "device_del"
    assert error.details["error_class"] == "DeviceNotFound"
    assert error.details["qemu_message"] == "Device 'nic9' not found"
    assert "device_del" in error.message and "Device 'nic9' not found" in error.message
    assert (await qmp.query_status()).running, "the session survives a command error"


async def test_unknown_command_is_a_qmp_error(qmp: QmpConnection) -> None:
    with pytest.raises(QmpError, match="has not been found"):
        await qmp.execute("no-such-command")


async def test_command_without_reply_times_out(qmp: QmpConnection, server: FakeQmpServer) -> None:
    server.stalled.add("query-status")
    with pytest.raises(VmError, match="no reply within") as caught:
        await qmp.execute("query-status", timeout=0.2)
    assert not isinstance(caught.value, QmpError)


async def test_hang_up_during_a_command_is_a_vm_error(qmp: QmpConnection,
                                                      server: FakeQmpServer) -> None:
    server.stalled.add("query-migrate")

    async def hang_up_later() -> None:
        await wait_until(lambda: "query-migrate" in server.executed(), 2, "the command")
        await server.hang_up()

    task = asyncio.create_task(hang_up_later())
    with pytest.raises(VmError, match="connection to QEMU lost") as caught:
        await qmp.query_migrate()
    await task
    assert not isinstance(caught.value, QmpError)
    assert await qmp.wait_closed(1.0)
    assert not qmp.connected
    with pytest.raises(VmError, match="not connected"):
        await qmp.query_status()


async def test_connect_to_missing_socket_is_a_vm_error(socket_dir: Path) -> None:
    connection = QmpConnection(socket_dir / "nobody.sock")
    with pytest.raises(VmError, match="cannot connect to QMP socket"):
        await connection.connect(timeout=1)
    assert not connection.connected


async def test_quit_tolerates_the_hang_up(qmp: QmpConnection, server: FakeQmpServer,
                                          events: list[tuple[str, dict[str, Any]]]) -> None:
    await qmp.quit()
    assert await qmp.wait_closed(2.0)
    assert ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}) in events


async def test_send_fd_passes_the_descriptor(qmp: QmpConnection, server: FakeQmpServer,
                                             socket_dir: Path) -> None:
    target = socket_dir / "state.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await qmp.send_fd(fd, "save-fd")
    finally:
        os.close(fd)
    assert ("getfd", {"fdname": "save-fd"}) in server.commands
    received = server.fds["save-fd"]
    os.write(received, b"written by QEMU")       # the server's copy is the same file
    assert target.read_bytes() == b"written by QEMU"
    await qmp.close_fd("save-fd")
    assert "save-fd" not in server.fds
    with pytest.raises(QmpError, match="not found"):
        await qmp.close_fd("save-fd")


async def test_getfd_without_descriptor_is_a_qmp_error(qmp: QmpConnection) -> None:
    with pytest.raises(QmpError, match="SCM_RIGHTS"):
        await qmp.execute("getfd", {"fdname": "x"})


async def test_query_migrate_is_typed(qmp: QmpConnection, server: FakeQmpServer) -> None:
    server.vm.migration = {"status": "active", "total-time": 120,
                           "ram": {"total": 1000, "remaining": 250, "transferred": 800}}
    info = await qmp.query_migrate()
    assert info == MigrationInfo(status="active", total_bytes=1000, remaining_bytes=250,
                                 transferred_bytes=800, total_time_ms=120)
    assert info.progress == 0.75 and not info.finished
    server.vm.migration = {"status": "failed", "error-desc": "Unable to write to file"}
    info = await qmp.query_migrate()
    assert info.finished and not info.succeeded and info.error == "Unable to write to file"
    assert MigrationInfo(status="completed", downtime_ms=12).progress == 1.0


async def test_migrate_parameters_use_qmp_names(qmp: QmpConnection, server: FakeQmpServer) -> None:
    server.handlers["migrate-set-parameters"] = lambda arguments: None
    await qmp.migrate_set_parameters(max_bandwidth=1 << 30, downtime_limit=300)
    assert server.commands[-1] == ("migrate-set-parameters",
                                   {"max-bandwidth": 1 << 30, "downtime-limit": 300})


def test_fake_parses_a_stream_of_objects() -> None:
    messages, rest = split_json_stream(b' {"execute":"a"}{"execute":"b","id":1} {"exe')
    assert messages == [{"execute": "a"}, {"execute": "b", "id": 1}]
    assert rest == b'{"exe'
