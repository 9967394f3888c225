"""QemuProcess against real QEMU (TCG): launch, control, exit detection, adopt, save/restore.

Most tests run a QEMU with no bootable device (it sits in SeaBIOS: enough for QMP and
process handling); save/restore boots the tiny guest to prove the state came back.
Every QEMU started here is stopped by PID in teardown.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from parvisor.errors import VmError
from parvisor.guest.agent import GuestAgent
from parvisor.model.vm import VmDefinition
from parvisor.vm.argv import LaunchSpec
from parvisor.vm.paths import VmPaths
from parvisor.vm.process import QemuProcess, is_qemu_for, runtime_files
from parvisor.testing.guest_fixtures import (pid_alive, qemu_available, short_state_dir,
                                             tiny_image_for_tests, wait_until)

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 missing")]

EXIT_NOTICE_LIMIT_S = 1.0
EXIT_NOTICE_MARGIN_S = 0.5     # scheduling noise on a loaded 2-core CI machine
BOOT_TIMEOUT_S = 90.0
READY = "parvisor-guest: userspace ready"
TEST_USER = "parvisor-qemu-test"


class Tracker:
    """Remembers every QEMU pid a test started and kills leftovers by PID."""

    def __init__(self) -> None:
        self.procs: list[QemuProcess] = []

    def add(self, proc: QemuProcess) -> QemuProcess:
        self.procs.append(proc)
        return proc

    def kill_leftovers(self) -> None:
        for proc in self.procs:
            if is_qemu_for(proc.pid, proc.vm_uuid):
                os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    directory = short_state_dir("pvp-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def tracker() -> AsyncIterator[Tracker]:
    track = Tracker()
    yield track
    for proc in track.procs:
        if not proc.exited and not proc.detached:
            await proc.stop(timeout=5)
    track.kill_leftovers()


def bare_spec(state_dir: Path, **overrides: Any) -> LaunchSpec:
    vm = VmDefinition.model_validate({"name": "bare", "boot": {"kind": "disk"},
                                      "memory_bytes": "128M"})
    return LaunchSpec(definition=vm, paths=VmPaths(state_dir, vm.uuid), accelerator="tcg",
                      **overrides)


def guest_spec(state_dir: Path) -> LaunchSpec:
    image = tiny_image_for_tests()
    vm = VmDefinition.model_validate({
        "name": "tiny", "memory_bytes": "256M",
        "boot": {"kind": "kernel", "kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": image.cmdline}})
    return LaunchSpec(definition=vm, paths=VmPaths(state_dir, vm.uuid), accelerator="tcg")


async def boot_guest(spec: LaunchSpec, tracker: Tracker) -> QemuProcess:
    proc = tracker.add(await QemuProcess.launch(spec))
    log = spec.paths.console_log
    await wait_until(lambda: log.exists() and READY in log.read_text(errors="replace"),
                     BOOT_TIMEOUT_S, "the guest's userspace")
    return proc


async def test_launch_pause_resume_stop(state_dir: Path, tracker: Tracker) -> None:
    events: list[str] = []
    spec = bare_spec(state_dir)
    proc = tracker.add(await QemuProcess.launch(spec, on_event=lambda n, d: events.append(n)))
    assert is_qemu_for(proc.pid, spec.definition.uuid)
    assert (spec.paths.root.stat().st_mode & 0o777) == 0o700
    assert (await proc.query_status()).running
    await proc.pause()
    status = await proc.query_status()
    assert (status.status, status.running) == ("paused", False)
    await proc.resume()
    assert (await proc.query_status()).running
    assert 0.0 <= proc.uptime_s < 60
    assert events[:2] == ["STOP", "RESUME"]
    # Our own session: QEMU is not in the test process's session (survives us).
    assert os.getsid(proc.pid) == proc.pid != os.getsid(0)

    info = await proc.stop()
    assert info.expected and "host requested quit" in info.reason
    assert not pid_alive(proc.pid)
    assert not any(path.exists() for path in runtime_files(spec.paths))


async def test_launch_failure_carries_qemu_stderr_and_argv(state_dir: Path) -> None:
    vm = VmDefinition.model_validate({"name": "broken", "boot": {
        "kind": "kernel", "kernel": str(state_dir / "no-such-kernel")}})
    spec = LaunchSpec(definition=vm, paths=VmPaths(state_dir, vm.uuid), accelerator="tcg")
    with pytest.raises(VmError) as caught:
        await QemuProcess.launch(spec, timeout=20)
    error = caught.value
    assert "could not open kernel file" in error.message    # QEMU's own words
    assert "no-such-kernel" in error.details["stderr"]
    assert error.details["argv"][0] == "qemu-system-x86_64"
    assert "-kernel" in error.details["argv"]
    assert not pid_alive(error.details["pid"])
    assert not any(path.exists() for path in runtime_files(spec.paths))


async def test_missing_binary_is_a_vm_error(state_dir: Path) -> None:
    spec = bare_spec(state_dir, qemu_binary=str(state_dir / "no-qemu"))
    with pytest.raises(VmError, match="cannot start"):
        await QemuProcess.launch(spec)


async def test_sigkill_is_noticed_within_a_second(state_dir: Path, tracker: Tracker) -> None:
    proc = tracker.add(await QemuProcess.launch(bare_spec(state_dir)))
    killed_at = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    info = await proc.wait_exited()
    noticed_after = time.monotonic() - killed_at
    print(f"SIGKILL noticed after {noticed_after * 1000:.1f} ms")
    assert noticed_after <= EXIT_NOTICE_LIMIT_S + EXIT_NOTICE_MARGIN_S, noticed_after
    assert not info.expected
    assert "QEMU exited unexpectedly" in info.reason and "SIGKILL" in info.reason
    assert info.shutdown_event is None and info.returncode == -signal.SIGKILL
    assert not pid_alive(proc.pid), "our child must be reaped, not left a zombie"


async def test_sigterm_from_outside_is_reported_as_not_ours(state_dir: Path,
                                                            tracker: Tracker) -> None:
    proc = tracker.add(await QemuProcess.launch(bare_spec(state_dir)))
    os.kill(proc.pid, signal.SIGTERM)     # an admin, not parvisor
    info = await proc.wait_exited()
    assert not info.expected and "outside parvisor" in info.reason
    assert info.shutdown_event == {"guest": False, "reason": "host-signal"}


async def test_adopt_after_a_service_restart(state_dir: Path, tracker: Tracker) -> None:
    spec = bare_spec(state_dir)
    first = tracker.add(await QemuProcess.launch(spec))
    await first.detach()                       # the old service goes away
    assert pid_alive(first.pid)

    events: list[str] = []
    adopted = await QemuProcess.adopt(spec.paths, spec.definition.uuid,
                                      on_event=lambda n, d: events.append(n))
    assert adopted is not None
    tracker.add(adopted)
    assert adopted.pid == first.pid
    assert (await adopted.query_status()).running
    assert adopted.uptime_s >= 0.0
    await adopted.pause()
    await wait_until(lambda: "STOP" in events, 2, "the STOP event")

    killed_at = time.monotonic()
    os.kill(adopted.pid, signal.SIGKILL)
    info = await adopted.wait_exited()
    assert time.monotonic() - killed_at <= EXIT_NOTICE_LIMIT_S + EXIT_NOTICE_MARGIN_S
    assert not info.expected and "unexpectedly" in info.reason
    assert not pid_alive(adopted.pid)
    # Nothing runs any more: adopt says so and removes the stale files.
    assert await QemuProcess.adopt(spec.paths, spec.definition.uuid) is None
    assert not spec.paths.pidfile.exists()


async def test_adopt_refuses_a_pid_that_is_not_our_qemu(state_dir: Path) -> None:
    paths = VmPaths(state_dir, "6f1c1f3e-0000-4000-8000-000000000001")
    paths.root.mkdir(parents=True)
    paths.pidfile.write_text(f"{os.getpid()}\n")   # alive, but it is pytest
    paths.qmp_socket.write_text("")
    assert await QemuProcess.adopt(paths, paths.uuid) is None
    assert not paths.pidfile.exists() and not paths.qmp_socket.exists()


async def test_stop_escalates_when_quit_gets_no_answer(state_dir: Path,
                                                       tracker: Tracker) -> None:
    proc = tracker.add(await QemuProcess.launch(bare_spec(state_dir)))
    os.kill(proc.pid, signal.SIGSTOP)     # frozen: no QMP reply, SIGTERM stays pending
    started = time.monotonic()
    info = await proc.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.expected and "killed" in info.reason
    assert info.returncode == -signal.SIGKILL
    assert not pid_alive(proc.pid)
    assert not proc.paths.pidfile.exists()


async def test_launch_refuses_a_second_qemu_for_the_same_vm(state_dir: Path,
                                                            tracker: Tracker) -> None:
    spec = bare_spec(state_dir)
    tracker.add(await QemuProcess.launch(spec))
    with pytest.raises(VmError, match="already running"):
        await QemuProcess.launch(spec)


async def test_save_then_restore_brings_the_guest_back(state_dir: Path,
                                                       tracker: Tracker) -> None:
    spec = guest_spec(state_dir)
    proc = await boot_guest(spec, tracker)
    agent = GuestAgent(spec.paths.qga_socket)
    marker = f"state-{os.getpid()}-{time.monotonic_ns()}"
    result = await agent.exec(["sh", "-c", f"echo {marker} > /tmp/marker"], timeout=30)
    assert result.exit_code == 0

    progress: list[float] = []
    state = spec.paths.saved_state
    started = time.monotonic()
    await proc.save(state, progress.append)
    save_s = time.monotonic() - started
    assert state.exists() and state.stat().st_size > 0
    assert not state.with_name(state.name + ".partial").exists()
    assert progress and progress[-1] == 1.0
    info = await proc.wait_exited()
    assert info.expected and not pid_alive(proc.pid)

    started = time.monotonic()
    restored = tracker.add(await QemuProcess.launch(spec, incoming_state=state))
    restore_s = time.monotonic() - started
    assert (await restored.query_status()).running
    # /tmp is RAM in the tiny guest: the marker is only there if memory came back.
    result = await agent.exec(["cat", "/tmp/marker"], timeout=30)
    assert result.stdout.decode().strip() == marker
    print(f"save {save_s:.2f} s, restore {restore_s:.2f} s, state {state.stat().st_size} bytes")
    await restored.stop()


async def test_failed_save_leaves_no_file_and_the_guest_running(state_dir: Path,
                                                                tracker: Tracker) -> None:
    proc = tracker.add(await QemuProcess.launch(bare_spec(state_dir)))
    target = state_dir / "missing-dir" / "saved.state"
    with pytest.raises(VmError, match="cannot create the state file"):
        await proc.save(target)
    assert not target.exists()
    assert (await proc.query_status()).running


@pytest.fixture
def tiny_fs(state_dir: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, so a save runs out of space halfway through."""
    mount_point = state_dir / "full"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


async def test_save_that_runs_out_of_space_rolls_back(state_dir: Path, tracker: Tracker,
                                                      tiny_fs: Path) -> None:
    proc = tracker.add(await QemuProcess.launch(bare_spec(state_dir)))
    target = tiny_fs / "saved.state"
    with pytest.raises(VmError, match="saving the VM state failed"):
        await proc.save(target)
    assert list(tiny_fs.iterdir()) == []
    assert (await proc.query_status()).running
    await proc.pause()
    with pytest.raises(VmError):
        await proc.save(target)
    assert (await proc.query_status()).status == "paused", "a paused guest stays paused"


def ensure_test_user() -> str:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", TEST_USER], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot create {TEST_USER}: {done.stderr.decode().strip()}")
    return TEST_USER


async def test_run_as_an_unprivileged_user(state_dir: Path, tracker: Tracker) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start QEMU as another user")
    user = ensure_test_user()
    state_dir.chmod(0o755)   # the user must be able to reach its runtime dir
    spec = bare_spec(state_dir, run_as=user)
    proc = tracker.add(await QemuProcess.launch(spec))
    uid = pwd.getpwnam(user).pw_uid
    status = Path(f"/proc/{proc.pid}/status").read_text()
    real, effective, saved, _fs = next(line.split()[1:] for line in status.splitlines()
                                       if line.startswith("Uid:"))
    assert {int(real), int(effective), int(saved)} == {uid}
    assert spec.paths.root.stat().st_uid == uid
    assert (await proc.query_status()).running
    info = await proc.stop()
    assert info.expected and not pid_alive(proc.pid)
