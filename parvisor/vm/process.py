"""``QemuProcess``: one object owns one running QEMU (the partition's worker process).

It starts QEMU (or adopts one after a service restart), holds its QMP session, notices
its exit within milliseconds through a pidfd (which works for processes that are not
our children too), saves/restores the full VM state to/from a file, and stops it
gracefully (``quit`` -> SIGTERM -> SIGKILL). QEMU runs in its own session with its
output in ``qemu.log``, so it survives the service being killed or restarted.

Glossary: *launch* = start a new QEMU; *adopt* = take over a QEMU that an earlier
service instance started; *detach* = let go of it without stopping it; *exit info* =
why QEMU ended (guest power-off, host request, or an unexpected exit).

This module must never speak raw QMP (that is ``parvisor.qmp.client``), never build
command lines (``parvisor.vm.argv``) and never decide VM lifecycle states: it reports
facts (running, exited and why) and the caller moves the state machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from parvisor.errors import QmpError, VmError
from parvisor.qmp.client import EventCallback, MigrationInfo, QmpConnection, RunStatus
from parvisor.vm.argv import LaunchSpec, build_argv
from parvisor.vm.paths import VmPaths
from parvisor.vm.prelaunch import prepare_platform, release_platform

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 2000
SAVE_FD_NAME = "parvisor-save"
RESTORE_FD_NAME = "parvisor-restore"
# Saving is a local copy of RAM into a file; QEMU's default cap (32 MiB/s) would make
# a 4 GiB guest take two minutes. QEMU 7.2 accepts up to this value.
SAVE_MAX_BANDWIDTH = 1 << 40
RUN_HEADER_END = b" starting QEMU\n"   # end of the line _spawn writes before each run
POLL_START_S = 0.02
POLL_MAX_S = 0.25


@dataclass(frozen=True)
class ExitInfo:
    """Why a QEMU process ended."""

    expected: bool
    reason: str
    shutdown_event: dict[str, Any] | None
    returncode: int | None = None     # only known when QEMU was our child


# --- runtime files ---------------------------------------------------------------------
def runtime_files(paths: VmPaths) -> tuple[Path, ...]:
    return (paths.qmp_socket, paths.qga_socket, paths.serial_socket, paths.vnc_socket,
            paths.pidfile)


def remove_runtime_files(paths: VmPaths) -> None:
    """Remove sockets and pidfile (never the console log, QEMU log or saved state)."""
    for path in runtime_files(paths):
        path.unlink(missing_ok=True)


def read_pidfile(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except (FileNotFoundError, PermissionError):
        return None
    return int(text) if text.isdigit() else None


def is_qemu_for(pid: int, vm_uuid: str) -> bool:
    """True when ``pid`` is alive and is the QEMU of this VM (its argv names the uuid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return vm_uuid.encode() in cmdline.split(b"\0")


def process_uptime(pid: int) -> float:
    """Seconds since ``pid`` started, from /proc (right for adopted processes too)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()    # the comm may contain spaces
    start_ticks = int(fields[19])                   # field 22 of proc(5), starttime
    since_boot = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))


def log_tail(path: Path, offset: int = 0, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last ``limit`` characters of QEMU's log written after ``offset``."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - limit))
            return f.read().decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def last_run_offset(path: Path, window: int = 1 << 16) -> int:
    """Where the newest run's output starts in QEMU's log (after our last header line);
    adopted processes use it so an exit report shows only their own run's output."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - window)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return 0
    marker = data.rfind(RUN_HEADER_END)
    return start + marker + len(RUN_HEADER_END) if marker >= 0 else start


def describe_returncode(returncode: int | None) -> str:
    if returncode is None:
        return "exit status unknown (not our child)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def prepare_root(paths: VmPaths, run_as: str | None) -> None:
    """Create the VM's runtime dir (0700); hand it to ``run_as`` so QEMU can use it
    after dropping privileges (hot-plugged files, the pidfile on exit)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o700)
    if run_as:
        try:
            user = pwd.getpwnam(run_as)
        except KeyError as exc:
            raise VmError(f"user {run_as!r} to run QEMU as does not exist") from exc
        for path in [paths.root, *paths.root.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)


# --- the process --------------------------------------------------------------------------
class QemuProcess:
    """One running QEMU. Create with ``launch`` or ``adopt``, never directly."""

    def __init__(self, *, paths: VmPaths, vm_uuid: str, pid: int, pidfd: int,
                 child: subprocess.Popen[bytes] | None, on_event: EventCallback | None,
                 argv: list[str] | None, log_offset: int) -> None:
        self.paths = paths
        self.vm_uuid = vm_uuid
        self.pid = pid
        self.argv = argv
        self._pidfd: int | None = pidfd
        self._child = child
        self._user_on_event = on_event
        self._log_offset = log_offset
        self._qmp = QmpConnection(paths.qmp_socket, on_event=self._on_qmp_event,
                                  name=f"qmp-{vm_uuid[:8]}")
        self._shutdown_event: dict[str, Any] | None = None
        self._requested_exit: str | None = None   # why *we* made it exit, if we did
        self._exit_info: ExitInfo | None = None
        self._exit_lock = asyncio.Lock()
        # (event name, match(data), future): one-shot waits for device_del & co.
        self._event_waiters: list[tuple[str, Callable[[dict[str, Any]], bool],
                                        asyncio.Future[dict[str, Any]]]] = []
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, self._on_pidfd_readable)

    # --- creation ------------------------------------------------------------------------
    @classmethod
    async def launch(cls, spec: LaunchSpec, *, on_event: EventCallback | None = None,
                     incoming_state: Path | None = None, timeout: float = 30,
                     restore_timeout: float = 600) -> "QemuProcess":
        """Start QEMU for ``spec``; VmError (with stderr tail and argv) when it fails."""
        if incoming_state is not None and not spec.incoming:
            spec = dataclasses.replace(spec, incoming=True)
        paths, uuid = spec.paths, spec.definition.uuid
        running = read_pidfile(paths.pidfile)
        if running is not None and is_qemu_for(running, uuid):
            raise VmError(f"QEMU for VM {spec.definition.name} is already running (pid {running})",
                          pid=running)
        prepare_root(paths, spec.run_as)
        remove_runtime_files(paths)
        argv = build_argv(spec)
        prepare_platform(spec)      # UEFI NVRAM, swtpm: released once QEMU has exited
        try:
            child, offset = _spawn(argv, paths.stderr_log)
        except BaseException:
            release_platform(paths)
            raise
        proc: QemuProcess | None = None
        started = False
        try:
            proc = cls(paths=paths, vm_uuid=uuid, pid=child.pid, pidfd=os.pidfd_open(child.pid),
                       child=child, on_event=on_event, argv=argv, log_offset=offset)
            await proc._await_startup(timeout)
            if incoming_state is not None:
                await proc._restore(incoming_state, restore_timeout)
                if not spec.start_paused:
                    await proc.resume()
            started = True
            log.info("vm %s: QEMU started, pid %d", spec.definition.name, child.pid)
            return proc
        except Exception as exc:
            raise await _launch_failure(proc, child, argv, paths, offset, exc) from exc
        finally:
            if not started:
                await _kill_failed_launch(proc, child, paths)

    @classmethod
    async def adopt(cls, paths: VmPaths, vm_uuid: str, *,
                    on_event: EventCallback | None = None) -> "QemuProcess | None":
        """Take over the QEMU an earlier service started; None (and stale files removed)
        when it is not running any more."""
        pid = read_pidfile(paths.pidfile)
        if pid is None or not is_qemu_for(pid, vm_uuid):
            remove_runtime_files(paths)
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            remove_runtime_files(paths)
            return None
        if not is_qemu_for(pid, vm_uuid):     # the pid was reused before pidfd_open
            os.close(pidfd)
            remove_runtime_files(paths)
            return None
        proc = cls(paths=paths, vm_uuid=vm_uuid, pid=pid, pidfd=pidfd, child=None,
                   on_event=on_event, argv=None,
                   log_offset=last_run_offset(paths.stderr_log))
        try:
            await proc._qmp.connect(timeout=10)
        except VmError:
            proc._release_pidfd()
            raise
        log.info("vm %s: adopted QEMU pid %d", vm_uuid, pid)
        return proc

    async def _await_startup(self, timeout: float) -> None:
        """Wait for the pidfile and a QMP session, failing early if QEMU exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.exited:
                raise VmError(f"QEMU exited during start-up ({self._child_status()})")
            if read_pidfile(self.paths.pidfile) == self.pid and self.paths.qmp_socket.exists():
                try:
                    await self._qmp.connect(timeout=max(0.1, deadline - loop.time()))
                    return
                except VmError:
                    if self.exited or loop.time() >= deadline:
                        raise
            if loop.time() >= deadline:
                raise VmError(f"QEMU did not open its QMP socket within {timeout:g} s")
            await self._wait_exit_for(POLL_START_S)

    # --- facts ---------------------------------------------------------------------------
    @property
    def exited(self) -> bool:
        return self._exited.done()

    @property
    def detached(self) -> bool:
        """True after ``detach`` (or once the exit was processed): no more watching."""
        return self._pidfd is None

    @property
    def uptime_s(self) -> float:
        try:
            return process_uptime(self.pid) if not self.exited else 0.0
        except (FileNotFoundError, ProcessLookupError):
            return 0.0

    # --- typed QMP wrappers ---------------------------------------------------------------
    async def query_status(self) -> RunStatus:
        return await self._qmp.query_status()

    async def pause(self) -> None:
        await self._qmp.stop()

    async def resume(self) -> None:
        await self._qmp.cont()

    async def powerdown(self) -> None:
        """Press the ACPI power button; the guest decides whether and when to stop."""
        await self._qmp.system_powerdown()

    async def reset(self) -> None:
        await self._qmp.system_reset()

    async def quit(self) -> None:
        """Ask QEMU to exit now (the guest is not asked); see ``wait_exited``."""
        self._requested_exit = self._requested_exit or "quit"
        await self._qmp.quit()

    @property
    def qmp(self) -> QmpConnection:
        """The QMP session, for device/migration modules that add their own commands."""
        return self._qmp

    # --- save / restore --------------------------------------------------------------------
    async def save(self, path: Path, progress: Callable[[float], None] | None = None, *,
                   timeout: float = 600) -> None:
        """Write the full VM state to ``path``, then quit QEMU.

        The state goes to ``<path>.partial`` and is renamed only when QEMU reports the
        migration completed, so a failed save never leaves a state file behind; the guest
        is then resumed if it was running.
        """
        path = Path(path)
        was_running = (await self.query_status()).running
        if was_running:
            await self.pause()
        partial = path.with_name(path.name + ".partial")
        try:
            await self._migrate_to_file(partial, progress, timeout)
        except BaseException:
            partial.unlink(missing_ok=True)
            await self._undo_failed_save(was_running)
            raise
        os.replace(partial, path)
        _fsync_dir(path.parent)
        self._requested_exit = "saved"
        await self._qmp.quit()
        await self.wait_exited()

    async def _migrate_to_file(self, partial: Path, progress: Callable[[float], None] | None,
                               timeout: float) -> None:
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VmError(f"cannot create the state file {partial}: {exc.strerror}") from exc
        try:
            await self._qmp.migrate_set_parameters(max_bandwidth=SAVE_MAX_BANDWIDTH)
            await self._qmp.send_fd(fd, SAVE_FD_NAME)
            await self._qmp.migrate(f"fd:{SAVE_FD_NAME}")   # QEMU consumes the named fd
            info = await self._wait_migration(progress, timeout)
            if not info.succeeded:
                raise VmError(f"saving the VM state failed: {info.error or info.status}",
                              migration_status=info.status)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def _undo_failed_save(self, was_running: bool) -> None:
        if self.exited or not self._qmp.connected:
            return
        for command in ("migrate_cancel", "closefd"):
            try:
                if command == "migrate_cancel":
                    await self._qmp.migrate_cancel()
                else:
                    await self._qmp.close_fd(SAVE_FD_NAME)
            except VmError:
                pass    # nothing to cancel / fd already consumed
        if was_running:
            try:
                await self.resume()
            except VmError as exc:
                log.error("vm %s: could not resume after failed save: %s", self.vm_uuid, exc)

    async def _restore(self, state: Path, timeout: float) -> None:
        """Load a state file written by ``save`` into this (``-incoming defer``) QEMU."""
        try:
            fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise VmError(f"cannot open saved state {state}: {exc.strerror}") from exc
        try:
            await self._qmp.send_fd(fd, RESTORE_FD_NAME)
        finally:
            os.close(fd)      # QEMU holds its own copy now
        await self._qmp.migrate_incoming(f"fd:{RESTORE_FD_NAME}")
        info = await self._wait_migration(None, timeout)
        if not info.succeeded:
            raise VmError(f"restoring the VM state failed: {info.error or info.status}")

    async def _wait_migration(self, progress: Callable[[float], None] | None,
                              timeout: float) -> MigrationInfo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = POLL_START_S
        while True:
            info = await self._qmp.query_migrate()
            if progress is not None:
                progress(info.progress)
            if info.finished:
                return info
            if loop.time() >= deadline:
                raise VmError(f"migration did not finish within {timeout:g} s",
                              migration_status=info.status)
            if await self._wait_exit_for(interval):
                raise VmError("QEMU exited during migration")
            interval = min(interval * 1.5, POLL_MAX_S)

    # --- exit ------------------------------------------------------------------------------
    def _on_pidfd_readable(self) -> None:
        # A pidfd becomes readable when the process exits, child or not.
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(None)

    def expect_event(self, name: str, match: Callable[[dict[str, Any]], bool]
                     ) -> "asyncio.Future[dict[str, Any]]":
        """A future for the next event ``name`` whose data satisfies ``match``.

        Register *before* sending the command that causes it (an event may arrive
        before the command's reply); cancel the future to stop waiting."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._event_waiters.append((name, match, future))
        return future

    def _on_qmp_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "SHUTDOWN":
            self._shutdown_event = data
        for waiter in list(self._event_waiters):
            wanted, match, future = waiter
            if future.done():
                self._event_waiters.remove(waiter)
            elif wanted == name and match(data):
                future.set_result(data)
                self._event_waiters.remove(waiter)
        if self._user_on_event is not None:
            self._user_on_event(name, data)

    async def _wait_exit_for(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for QEMU to exit; True when it has."""
        if not self._exited.done():
            await asyncio.wait({self._exited}, timeout=seconds)
        return self._exited.done()

    async def wait_exited(self) -> ExitInfo:
        """Return once QEMU has exited, with why (reaps it when it is our child)."""
        await asyncio.shield(self._exited)
        async with self._exit_lock:
            if self._exit_info is None:
                # The socket still holds what QEMU sent before dying (SHUTDOWN): let the
                # reader drain it before deciding whether the exit was expected.
                await self._qmp.wait_closed(0.5)
                await self._qmp.disconnect()
                returncode = self._reap()
                release_platform(self.paths)
                self._exit_info = self._classify_exit(returncode)
                self._release_pidfd()
                log.info("vm %s: QEMU pid %d exited: %s", self.vm_uuid, self.pid,
                         self._exit_info.reason)
        return self._exit_info

    def _reap(self) -> int | None:
        if self._child is not None:
            return self._child.poll()
        try:   # adopted by this same process (tests, in-process restarts): still reap
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            return os.waitstatus_to_exitcode(status) if pid == self.pid else None
        except ChildProcessError:
            return None

    def _child_status(self) -> str:
        returncode = self._child.poll() if self._child is not None else None
        return describe_returncode(returncode)

    def _classify_exit(self, returncode: int | None) -> ExitInfo:
        event, requested = self._shutdown_event, self._requested_exit
        shutdown_reason = (event or {}).get("reason", "unknown")
        if event is not None and event.get("guest"):
            return ExitInfo(True, f"guest powered off ({shutdown_reason})", event, returncode)
        if requested is not None:
            how = "QEMU quit" if event is not None else describe_returncode(returncode)
            return ExitInfo(True, f"host requested quit ({requested}; {how})", event, returncode)
        if event is not None and shutdown_reason == "host-qmp-quit":
            return ExitInfo(True, "host requested quit (QMP quit)", event, returncode)
        if event is not None:
            return ExitInfo(False, "QEMU was stopped from outside parvisor"
                            f" ({shutdown_reason})", event, returncode)
        tail = log_tail(self.paths.stderr_log, self._log_offset)
        reason = f"QEMU exited unexpectedly ({describe_returncode(returncode)})"
        return ExitInfo(False, reason + (f": {tail}" if tail else ""), None, returncode)

    # --- stopping ----------------------------------------------------------------------------
    async def stop(self, timeout: float = 10) -> ExitInfo:
        """Stop QEMU now: ``quit``, then SIGTERM, then SIGKILL, each with a timeout.

        The guest is not asked (that is ``powerdown``). Sockets and pidfile are removed
        whatever happens.
        """
        if self.detached and not self.exited:
            raise VmError(f"QEMU pid {self.pid} was detached; adopt it again to stop it")
        try:
            if not self.exited:
                self._requested_exit = self._requested_exit or "stop"
                if self._qmp.connected:
                    with _suppress_vm_error():
                        await asyncio.wait_for(self._qmp.quit(), timeout)
                await self._escalate(timeout)
            return await self.wait_exited()
        finally:
            await self._qmp.disconnect()
            remove_runtime_files(self.paths)

    async def _escalate(self, timeout: float) -> None:
        if await self._wait_exit_for(timeout):
            return
        log.warning("vm %s: QEMU pid %d ignored quit, sending SIGTERM", self.vm_uuid, self.pid)
        self._send_signal(signal.SIGTERM)
        if await self._wait_exit_for(min(timeout, 5.0)):
            return
        log.warning("vm %s: QEMU pid %d ignored SIGTERM, sending SIGKILL", self.vm_uuid, self.pid)
        self._requested_exit = "killed"
        self._send_signal(signal.SIGKILL)
        if not await self._wait_exit_for(10.0):
            raise VmError(f"QEMU pid {self.pid} did not exit after SIGKILL", pid=self.pid)

    def _send_signal(self, sig: signal.Signals) -> None:
        # Through the pidfd: a recycled pid can never receive our signal.
        if self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    async def detach(self) -> None:
        """Let go of QEMU without stopping it (the service is shutting down)."""
        await self._qmp.disconnect()
        self._release_pidfd()

    def _release_pidfd(self) -> None:
        if self._pidfd is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        except RuntimeError:
            pass   # no running loop: nothing registered any more
        os.close(self._pidfd)
        self._pidfd = None

    def __repr__(self) -> str:
        return f"<QemuProcess vm={self.vm_uuid} pid={self.pid} exited={self.exited}>"


# --- launch helpers ----------------------------------------------------------------------
def _spawn(argv: list[str], stderr_log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start QEMU in its own session with output appended to ``stderr_log``.

    Never pipes: a pipe would tie QEMU's life to ours (SIGPIPE once we are gone).
    Returns the child and the log offset where this run's output starts.
    """
    with stderr_log.open("ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}".encode() + RUN_HEADER_END)
        out.flush()
        offset = out.tell()
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True, close_fds=True)
        except OSError as exc:
            raise VmError(f"cannot start {argv[0]}: {exc.strerror}", argv=argv) from exc
    return child, offset


async def _launch_failure(proc: QemuProcess | None, child: subprocess.Popen[bytes],
                          argv: list[str], paths: VmPaths, offset: int,
                          exc: Exception) -> VmError:
    """The VmError for a failed launch, once QEMU is gone (so its stderr is complete)."""
    await _kill_failed_launch(proc, child, paths)
    tail = log_tail(paths.stderr_log, offset)
    cause = exc.message if isinstance(exc, VmError) else f"{type(exc).__name__}: {exc}"
    message = f"QEMU failed to start: {cause}"
    if tail:
        message += f"; QEMU said: {tail}"
    return VmError(message, argv=argv, stderr=tail, pid=child.pid,
                   qmp_error=isinstance(exc, QmpError))


async def _kill_failed_launch(proc: QemuProcess | None, child: subprocess.Popen[bytes],
                              paths: VmPaths) -> None:
    """Kill and reap what a failed launch started; idempotent."""
    if child.poll() is None:
        child.kill()
        await _wait_child(child, 10.0)
    if proc is not None:
        await proc._qmp.disconnect()
        proc._release_pidfd()
    remove_runtime_files(paths)
    release_platform(paths)


async def _wait_child(child: subprocess.Popen[bytes], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    while child.poll() is None and loop.time() < deadline:
        await asyncio.sleep(delay)    # polling a condition, bounded by the deadline
        delay = min(delay * 2, 0.1)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _suppress_vm_error:
    """``with _suppress_vm_error():`` – a failed graceful step just moves to the next."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, (VmError, asyncio.TimeoutError))
