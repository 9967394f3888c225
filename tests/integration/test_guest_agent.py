"""GuestAgent against qemu-ga in the tiny guest (real QEMU, TCG).

One guest boots for the read-only checks (module scope, ~3 s under TCG); the shutdown
test boots its own, since it ends the guest. Every QEMU is stopped by PID in teardown.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from parvisor.errors import GuestAgentError
from parvisor.guest.agent import GuestAgent
from parvisor.image.tiny import TinyImage
from parvisor.model.vm import VmDefinition
from parvisor.vm.argv import LaunchSpec
from parvisor.vm.paths import VmPaths
from parvisor.vm.process import QemuProcess, is_qemu_for
from parvisor.testing.guest_fixtures import (pid_alive, qemu_available, short_state_dir,
                                             tiny_image_for_tests, wait_until)

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 missing")]

BOOT_TIMEOUT_S = 90.0
READY = "parvisor-guest: userspace ready"


def tiny_spec(state_dir: Path, image: TinyImage) -> LaunchSpec:
    vm = VmDefinition.model_validate({
        "name": "agent-test", "memory_bytes": "256M",
        "boot": {"kind": "kernel", "kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": image.cmdline}})
    return LaunchSpec(definition=vm, paths=VmPaths(state_dir, vm.uuid), accelerator="tcg")


async def boot(spec: LaunchSpec) -> QemuProcess:
    proc = await QemuProcess.launch(spec)
    log = spec.paths.console_log
    try:
        await wait_until(lambda: log.exists() and READY in log.read_text(errors="replace"),
                         BOOT_TIMEOUT_S, "the guest's userspace")
    except BaseException:
        await proc.stop()
        raise
    return proc


async def stop_by_pid(proc: QemuProcess) -> None:
    if not proc.exited:
        await proc.stop(timeout=5)
    assert not is_qemu_for(proc.pid, proc.vm_uuid)


@pytest.fixture(scope="module")
def image() -> TinyImage:
    return tiny_image_for_tests()


@pytest.fixture(scope="module")
def module_state_dir() -> Iterator[Path]:
    directory = short_state_dir("pvg-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(image: TinyImage, module_state_dir: Path) -> AsyncIterator[QemuProcess]:
    proc = await boot(tiny_spec(module_state_dir, image))
    yield proc
    await stop_by_pid(proc)


@pytest.fixture
def agent(guest: QemuProcess) -> GuestAgent:
    return GuestAgent(guest.paths.qga_socket)


async def test_ping(agent: GuestAgent) -> None:
    await agent.ping(timeout=30)     # the first answer may wait for qemu-ga to start


async def test_exec_returns_output_and_exit_code(agent: GuestAgent, image: TinyImage) -> None:
    started = time.monotonic()
    result = await agent.exec(["uname", "-r"], timeout=30)
    print(f"guest-exec uname -r: {time.monotonic() - started:.3f} s")
    assert result.exit_code == 0
    assert result.stdout.decode().strip() == image.kernel_release
    assert (await agent.exec(["false"], timeout=30)).exit_code == 1


async def test_exec_feeds_stdin_and_captures_stderr(agent: GuestAgent) -> None:
    result = await agent.exec(["cat"], input=b"hello from the host", timeout=30)
    assert result.stdout == b"hello from the host"
    result = await agent.exec(["sh", "-c", "echo oops >&2; exit 3"], timeout=30)
    assert (result.exit_code, result.stderr) == (3, b"oops\n")


async def test_exec_timeout_is_a_guest_agent_error(agent: GuestAgent) -> None:
    with pytest.raises(GuestAgentError, match="did not finish in time") as caught:
        await agent.exec(["sleep", "5"], timeout=0.5)
    assert caught.value.details["kind"] == "timeout"
    await agent.ping()      # the agent is fine afterwards


async def test_agent_errors_carry_its_message(agent: GuestAgent) -> None:
    with pytest.raises(GuestAgentError) as caught:
        await agent.exec(["/no/such/program"], timeout=10)
    assert caught.value.details["kind"] == "agent"
    assert "guest-exec" in caught.value.message


async def test_info_os_info_and_addresses(agent: GuestAgent, image: TinyImage) -> None:
    info = await agent.info()
    assert "guest-exec" in info.supported_commands and info.version
    os_info = await agent.os_info()
    assert os_info.kernel_release == image.kernel_release
    assert os_info.as_dict()["kernel_release"] == image.kernel_release
    interfaces = await agent.network_interfaces()
    assert "lo" in [i.name for i in interfaces]
    assert "127.0.0.1" in await agent.ip_addresses()


async def test_set_time(agent: GuestAgent) -> None:
    await agent.set_time(time.time_ns())
    await agent.set_time()


async def test_calls_resync_after_an_abandoned_connection(agent: GuestAgent,
                                                          guest: QemuProcess) -> None:
    # A client that sends half a command and vanishes must not confuse the next one.
    reader, writer = await asyncio.open_unix_connection(str(guest.paths.qga_socket))
    writer.write(b'{"execute": "guest-pi')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await agent.ping(timeout=10)


async def test_no_agent_is_a_timeout() -> None:
    state_dir = short_state_dir("pvn-")
    vm = VmDefinition.model_validate({"name": "noagent", "boot": {"kind": "disk"},
                                      "memory_bytes": "64M"})
    spec = LaunchSpec(definition=vm, paths=VmPaths(state_dir, vm.uuid), accelerator="tcg")
    proc = await QemuProcess.launch(spec)
    try:
        with pytest.raises(GuestAgentError) as caught:
            await GuestAgent(spec.paths.qga_socket).ping(timeout=0.5)
        assert caught.value.details["kind"] == "timeout"
    finally:
        await stop_by_pid(proc)
        shutil.rmtree(state_dir, ignore_errors=True)
    with pytest.raises(GuestAgentError) as caught:
        await GuestAgent(spec.paths.qga_socket).ping(timeout=0.5)
    assert caught.value.details["kind"] == "disconnected"


async def test_shutdown_powers_the_guest_off(image: TinyImage) -> None:
    state_dir = short_state_dir("pvs-")
    proc = await boot(tiny_spec(state_dir, image))
    try:
        agent = GuestAgent(proc.paths.qga_socket)
        await agent.ping(timeout=30)
        started = time.monotonic()
        await agent.shutdown()
        info = await asyncio.wait_for(proc.wait_exited(), 60)
        print(f"guest-shutdown to QEMU exit: {time.monotonic() - started:.2f} s")
        assert info.expected and "guest powered off" in info.reason
        assert info.shutdown_event is not None and info.shutdown_event["guest"] is True
        assert not pid_alive(proc.pid)
        assert "parvisor-guest: powering off" in proc.paths.console_log.read_text(errors="replace")
    finally:
        await stop_by_pid(proc)
        shutil.rmtree(state_dir, ignore_errors=True)
