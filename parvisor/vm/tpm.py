"""The virtual TPM 2.0 of one VM: one ``swtpm`` process, started before QEMU, stopped after.

swtpm keeps the TPM's persistent state (keys, NV indices, PCR policy) in
``<vm dir>/tpm/``, which survives restarts like the UEFI NVRAM. It runs as a daemon
in its own session (so it outlives a restart of the service, like QEMU) and listens on
``<vm dir>/swtpm.sock``, QEMU's ``tpm-emulator`` control channel. ``--terminate`` makes
it exit by itself when QEMU closes that channel (QEMU exited, crashed or was killed), so
a stray swtpm never outlives its QEMU even when nobody calls ``stop_swtpm``.

Processes are only ever signalled by PID (from our pidfile, checked against
``/proc/<pid>/cmdline`` and held through a pidfd), never by name.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import subprocess
from pathlib import Path

from parvisor.errors import VmError
from parvisor.vm.firmware import tpm_pidfile, tpm_socket, tpm_state_dir
from parvisor.vm.paths import VmPaths

SWTPM = "swtpm"
STOP_TIMEOUT_S = 5.0


def swtpm_argv(paths: VmPaths, run_as: str | None) -> list[str]:
    argv = [SWTPM, "socket", "--tpm2",
            "--tpmstate", f"dir={tpm_state_dir(paths)},mode=0600",
            "--ctrl", f"type=unixio,path={tpm_socket(paths)},mode=0600",
            "--pid", f"file={tpm_pidfile(paths)}",
            "--log", f"file={paths.root / 'swtpm.log'},level=1",
            "--terminate", "--daemon"]
    if run_as:
        argv += ["--runas", run_as]
    return argv


def swtpm_pid(paths: VmPaths) -> int | None:
    """The pid of this VM's live swtpm, or None (no pidfile, dead, or a reused pid)."""
    try:
        text = tpm_pidfile(paths).read_text().strip()
        cmdline = Path(f"/proc/{int(text)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # The socket path names the VM's directory, so it identifies *our* swtpm.
    wanted = f"type=unixio,path={tpm_socket(paths)},".encode()
    if any(arg.startswith(wanted) for arg in cmdline.split(b"\0")):
        return int(text)
    return None


def start_swtpm(paths: VmPaths, run_as: str | None = None) -> int:
    """Start the VM's swtpm (reusing a live one); returns its pid. VmError on failure."""
    running = swtpm_pid(paths)
    if running is not None:
        return running
    if shutil.which(SWTPM) is None:
        raise VmError("this VM has a virtual TPM but swtpm is not installed "
                      "(Debian package swtpm)")
    state = tpm_state_dir(paths)
    state.mkdir(mode=0o700, exist_ok=True)
    tpm_socket(paths).unlink(missing_ok=True)
    if run_as:
        user = pwd.getpwnam(run_as)
        os.chown(state, user.pw_uid, user.pw_gid)
    argv = swtpm_argv(paths, run_as)
    # --daemon: the call returns once the socket and the pidfile exist (checked below).
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True, check=False)
    pid = swtpm_pid(paths)
    if done.returncode != 0 or pid is None or not tpm_socket(paths).exists():
        reason = (done.stderr or done.stdout).strip() or _log_tail(paths) \
            or f"exit code {done.returncode}"
        raise VmError(f"cannot start the virtual TPM (swtpm): {reason}", argv=argv)
    return pid


def _log_tail(paths: VmPaths) -> str:
    # swtpm reports start-up errors (bad paths, socket path too long) in its log file.
    try:
        return (paths.root / "swtpm.log").read_text(errors="replace").strip()[-500:]
    except OSError:
        return ""


def stop_swtpm(paths: VmPaths, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop the VM's swtpm if it still runs: SIGTERM, then SIGKILL; idempotent."""
    pid = swtpm_pid(paths)
    if pid is not None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None:
            try:
                _terminate(pidfd, timeout)
            finally:
                os.close(pidfd)
    tpm_pidfile(paths).unlink(missing_ok=True)
    tpm_socket(paths).unlink(missing_ok=True)


def _terminate(pidfd: int, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return
        # A pidfd is readable once the process has exited: wait exactly that long.
        if select.select([pidfd], [], [], timeout)[0]:
            return
