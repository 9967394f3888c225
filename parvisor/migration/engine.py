"""The QEMU side of live migration: two QEMUs, one stream, the source stays safe.

The caller (the cluster protocol) owns the order and the ownership switch; this module
drives QMP on each side. The order for one migration:

destination (launched with ``LaunchSpec(incoming=True)``: ``-S -incoming defer``)::

    uri = await prepare_incoming(dest, host, free_port(host), policy=policy)
    # shared-nothing only (``--with-storage``): the destination was launched with its
    # own, empty target images of the same virtual sizes
    nbd = await export_disks(dest, host, free_port(host), mirrored_nodes(definition))

source::

    await mirror_disks(source, nbd, mirrored_nodes(definition))      # storage only
    result = await migrate_out(source, uri, policy, mirroring=bool(storage))
    # success: the source is PAUSED in postmigrate, the destination has everything

then the caller switches ownership, and::

    await stop_export(dest)            # storage only (resume_incoming also does it)
    await resume_incoming(dest)        # checks the load completed, then ``cont``
    await source.quit()

On any failure ``migrate_out`` raises ``MigrationFailed``/``MigrationCancelled`` only
after the source runs again (if it ran before); the caller then ``abort_incoming(dest)``.
A source service restarted mid-migration calls ``recover_source``.

Why pause-before-switchover with storage: the mirror jobs are completed
(``block-job-cancel`` on a ready mirror = final sync, no pivot) while the source is
paused *before* the device state goes out, so the destination can never start on a disk
that misses the last writes, and the source's block nodes are inactivated with no job
running on them. ``finish_mirror`` is therefore called inside ``migrate_out``; it stays
public (and idempotent) for callers that drive the steps themselves.

Never here: ``cont`` a source the user had paused, cancel a migration in post-copy (the
VM would be lost), or touch the destination's run state before the caller says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from parvisor.errors import MigrationCancelled, MigrationFailed, QmpError, VmError
from parvisor.migration.policy import (ACTIVE_STATUSES, POSTCOPY_STATUSES, Abort,
                                       ConvergencePolicy, ConvergenceState,
                                       EnableAutoConverge, MigrationSample, SetDowntime,
                                       StartPostcopy, eta_s, next_action)
from parvisor.model.vm import VmDefinition
from parvisor.vm.argv import disk_node_names
from parvisor.vm.process import QemuProcess

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.15
RESUME_POLL_S = 0.01        # the destination finishing its load is on the guest's pause
CANCEL_TIMEOUT_S = 30.0
MIRROR_READY_TIMEOUT_S = 3600.0
MIRROR_FINISH_TIMEOUT_S = 120.0
# QEMU's max-bandwidth is bytes/s; 1 TiB/s is "unlimited" (QEMU 7.2 accepts up to it).
UNLIMITED_BANDWIDTH = 1 << 40
TLS_OBJECT_ID = "parvisor-migration-tls"
MIG_PREFIX = "mig-"        # job ids, NBD client nodes and export ids we create
# QEMU's defaults, restored after a failed attempt so a later save/migration starts clean
DEFAULT_PARAMETERS: dict[str, Any] = {
    "downtime-limit": 300, "max-bandwidth": 128 << 20, "tls-creds": "", "tls-hostname": "",
    "max-postcopy-bandwidth": 0, "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
}
THROTTLE_ON = {"throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
               "cpu-throttle-increment": 10, "max-cpu-throttle": 99}
# Capabilities cannot change while a migration runs, so auto-converge is switched on
# from the start but "armed" with the weakest throttle QEMU allows (1 %, only when the
# guest dirties more than the link carries); EnableAutoConverge sets THROTTLE_ON.
THROTTLE_ARMED = {"throttle-trigger-threshold": 100, "cpu-throttle-initial": 1,
                  "cpu-throttle-increment": 1, "max-cpu-throttle": 1}
MANAGED_CAPABILITIES = ("xbzrle", "auto-converge", "events", "postcopy-ram", "return-path",
                        "pause-before-switchover", "multifd", "validate-uuid",
                        "late-block-activate")
ProgressCallback = Callable[["MigrationProgress"], None]


@dataclass(frozen=True)
class MigrationProgress:
    """What the caller shows while a migration (or its disk copy) runs."""

    status: str                  # QEMU's status, or "mirroring" during the disk copy
    passes: int
    ram_remaining: int
    ram_total: int
    dirty_rate: int              # bytes/s
    disk_remaining: int
    disk_total: int
    eta_s: float | None
    transferred: int
    downtime_limit_ms: int


@dataclass(frozen=True)
class MigrationResult:
    total_time_ms: int
    downtime_ms: int             # as QEMU reports it (stop on the source -> sent)
    transferred_bytes: int
    setup_time_ms: int
    passes: int
    downtime_limit_ms: int       # the final one
    auto_converge: bool = False  # whether the policy had to throttle the guest
    postcopy: bool = False


# --- helpers -----------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller binds it soon after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tcp_uri(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def uri_host(uri: str) -> str:
    """The host part of ``tcp:HOST:PORT`` (brackets of IPv6 removed)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    host = rest.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def mirrored_nodes(definition: VmDefinition) -> list[str]:
    """Block nodes a shared-nothing migration copies: the *format* node
    (``fmt-<disk id>``, see ``parvisor.vm.argv.disk_node_names``) of every writable disk.

    The same names exist on the destination (same definition, its own image paths), so
    they are both what the destination exports and what the source mirrors from.
    Read-only media (ISOs, shared bases) are not copied: they must exist there.
    """
    return [disk_node_names(d)[1] for d in definition.disks
            if d.media == "disk" and d.path is not None and not d.readonly]


def _mig_id(node: str) -> str:
    return MIG_PREFIX + node     # <= 31 chars: node names from argv are <= 27


async def _execute(process: QemuProcess, command: str,
                   arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
    return await process.qmp.execute(command, arguments, **kw)


async def _set_capabilities(process: QemuProcess, caps: dict[str, bool]) -> None:
    await _execute(process, "migrate-set-capabilities", {"capabilities": [
        {"capability": name, "state": state} for name, state in caps.items()]})


async def _set_parameters(process: QemuProcess, params: dict[str, Any]) -> None:
    await _execute(process, "migrate-set-parameters", params)


def _capabilities(policy: ConvergencePolicy, *, source: bool,
                  mirroring: bool = False) -> dict[str, bool]:
    """Capabilities per side. xbzrle, multifd and postcopy-ram must match on both
    sides (QEMU needs them on the destination too); return-path lets the source learn
    that the destination failed to load the state (it fails instead of "completed")."""
    caps = {"xbzrle": policy.xbzrle, "postcopy-ram": policy.postcopy,
            "multifd": policy.multifd_channels > 0, "return-path": True}
    if source:
        caps.update({"auto-converge": policy.auto_converge_after is not None,
                     "events": True, "pause-before-switchover": mirroring,
                     # the destination refuses a stream from a VM with another uuid
                     "validate-uuid": True})
    else:
        # images are activated only at `cont`: until the caller resumes the
        # destination, the source may still take its (shared) disks back safely
        caps["late-block-activate"] = True
    return caps


async def _tls_object(process: QemuProcess, creds_dir: Path, endpoint: str) -> str:
    """Create (or re-create) the tls-creds-x509 object; returns its id."""
    try:
        await _execute(process, "object-del", {"id": TLS_OBJECT_ID})
    except QmpError:
        pass    # none yet
    await _execute(process, "object-add", {
        "qom-type": "tls-creds-x509", "id": TLS_OBJECT_ID, "dir": str(creds_dir),
        "endpoint": endpoint, "verify-peer": True})
    return TLS_OBJECT_ID


async def _has_tls_object(process: QemuProcess) -> bool:
    children = await _execute(process, "qom-list", {"path": "/objects"})
    return any(c.get("name") == TLS_OBJECT_ID for c in children)


async def reset_migration_settings(process: QemuProcess) -> None:
    """Public form of the settings reset (after a post-copy migration completed on the
    destination, which ``resume_incoming`` could not wait for)."""
    await _reset_settings(process)


async def _reset_settings(process: QemuProcess) -> None:
    """Back to QEMU's defaults, so a later save (fd: migration) or migration does not
    inherit TLS, return-path and friends from this one."""
    if process.exited or not process.qmp.connected:
        return
    for step in (lambda: _set_capabilities(process, dict.fromkeys(MANAGED_CAPABILITIES,
                                                                  False)),
                 lambda: _set_parameters(process, DEFAULT_PARAMETERS),
                 lambda: _execute(process, "object-del", {"id": TLS_OBJECT_ID})):
        try:
            await step()
        except VmError as exc:
            log.debug("migration settings reset: %s", exc.message)


def _emit(on_progress: ProgressCallback | None, progress: MigrationProgress) -> None:
    if on_progress is None:
        return
    try:
        on_progress(progress)
    except Exception:    # a broken progress display must not break the migration
        log.exception("migration progress callback failed")


# --- destination -------------------------------------------------------------------------
async def prepare_incoming(process: QemuProcess, listen_host: str, port: int, *,
                           policy: ConvergencePolicy,
                           tls_creds_dir: Path | None = None) -> str:
    """Make the ``-incoming defer`` QEMU listen; returns the URI the source must use."""
    caps = _capabilities(policy, source=False)
    await _set_capabilities(process, caps)
    params: dict[str, Any] = {}
    if policy.multifd_channels:
        params["multifd-channels"] = policy.multifd_channels
    if tls_creds_dir is not None:
        params["tls-creds"] = await _tls_object(process, Path(tls_creds_dir), "server")
    else:
        params["tls-creds"] = ""
    await _set_parameters(process, params)
    uri = tcp_uri(listen_host, port)
    await _execute(process, "migrate-incoming", {"uri": uri})
    log.info("migration: destination pid %d listens on %s%s", process.pid, uri,
             " (TLS)" if tls_creds_dir else "")
    return uri


async def export_disks(process: QemuProcess, listen_host: str, port: int,
                       disks: list[str], *, tls_creds_dir: Path | None = None) -> str:
    """Export the destination's (empty) target nodes over NBD, writable; returns the
    ``nbd://HOST:PORT`` base the source mirrors to (export name = node name).

    ``disks`` are format node names (``mirrored_nodes``). QEMU activates an exported
    node early; the guest device takes its write permission only at ``cont``."""
    host = f"[{listen_host}]" if ":" in listen_host else listen_host
    start: dict[str, Any] = {"addr": {"type": "inet",
                                      "data": {"host": listen_host, "port": str(port)}}}
    if tls_creds_dir is not None:
        if not await _has_tls_object(process):
            await _tls_object(process, Path(tls_creds_dir), "server")
        start["tls-creds"] = TLS_OBJECT_ID
    await _execute(process, "nbd-server-start", start)
    try:
        for node in disks:
            await _execute(process, "block-export-add", {
                "type": "nbd", "id": _mig_id(node), "node-name": node, "name": node,
                "writable": True})
    except BaseException:
        await stop_export(process, force=True)
        raise
    return f"nbd://{host}:{port}"


async def stop_export(process: QemuProcess, *, force: bool = False) -> None:
    """Remove our NBD exports and stop the NBD server (idempotent; ``force`` stops the
    server even when no export of ours is left)."""
    if process.exited or not process.qmp.connected:
        return
    try:
        exports = await _execute(process, "query-block-exports")
    except QmpError:
        exports = []
    ours = [e for e in exports if str(e.get("id", "")).startswith(MIG_PREFIX)]
    if not ours and not force:
        return      # nothing exported (or already stopped): no extra round trips
    for export in ours:
        try:
            await _execute(process, "block-export-del", {"id": export["id"]})
        except QmpError as exc:
            log.debug("block-export-del %s: %s", export["id"], exc.message)
    try:
        await _execute(process, "nbd-server-stop")
    except QmpError:
        pass    # not running


async def resume_incoming(process: QemuProcess, *, start: bool = True,
                          postcopy: bool = False, timeout: float = 60.0) -> None:
    """After the ownership switch: check the destination loaded the complete state,
    then ``cont`` it (``start=False``: a VM the user had paused stays paused).

    ``postcopy=True`` (from ``migrate_out``'s ``on_postcopy``): an incoming migration in
    post-copy counts too; the guest runs and pulls missing pages from the source."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if process.exited:
            raise MigrationFailed("the destination QEMU exited before it was resumed")
        try:
            info = MigrationSample.from_reply(await _execute(process, "query-migrate"))
            run = await process.query_status()
        except VmError as exc:
            raise MigrationFailed(f"destination QEMU does not answer: {exc.message}") from exc
        if info.status == "failed":
            raise MigrationFailed(f"the destination failed to load the VM state:"
                                  f" {info.error or 'no reason given'}")
        if info.status == "completed" and run.status != "inmigrate":
            break
        if postcopy and info.status in POSTCOPY_STATUSES and run.status != "inmigrate":
            break
        if loop.time() >= deadline:
            raise MigrationFailed(f"incoming migration not complete after {timeout:g} s"
                                  f" (migration {info.status}, VM {run.status})")
        await asyncio.sleep(RESUME_POLL_S)
    await stop_export(process)
    if start and not run.running:
        await process.resume()
    if info.status == "completed":     # after cont: not part of the guest's pause
        await _reset_settings(process)    # (post-copy: reset_migration_settings later)
    log.info("migration: destination pid %d %s", process.pid,
             "resumed" if start else "left paused")


async def abort_incoming(process: QemuProcess, *, timeout: float = 10.0) -> None:
    """Throw the incoming QEMU away (quit, then SIGTERM/SIGKILL)."""
    if process.exited:
        await process.wait_exited()
        return
    await process.stop(timeout=timeout)


# --- storage (source side) ---------------------------------------------------------------
async def _mig_jobs(process: QemuProcess) -> list[dict[str, Any]]:
    jobs = await _execute(process, "query-block-jobs")
    return [j for j in jobs if str(j.get("device", "")).startswith(MIG_PREFIX)]


async def _mig_nbd_nodes(process: QemuProcess) -> list[str]:
    nodes = await _execute(process, "query-named-block-nodes", {"flat": True})
    return [n["node-name"] for n in nodes
            if str(n.get("node-name", "")).startswith(MIG_PREFIX) and n.get("drv") == "nbd"]


def _disk_progress(jobs: Iterable[dict[str, Any]]) -> tuple[int, int]:
    total = remaining = 0
    for job in jobs:
        total += int(job.get("len", 0))
        remaining += max(0, int(job.get("len", 0)) - int(job.get("offset", 0)))
    return total, remaining


async def mirror_disks(process: QemuProcess, nbd_uri: str, disks: list[str],
                       on_progress: ProgressCallback | None = None, *,
                       speed: int | None = None, copy_mode: str = "background",
                       tls_creds_dir: Path | None = None, tls_hostname: str | None = None,
                       timeout: float = MIRROR_READY_TIMEOUT_S) -> None:
    """Copy each disk into the destination's NBD export and return once every mirror
    is *ready* (in sync; later guest writes are mirrored as they happen).

    ``copy_mode="write-blocking"`` makes guest writes wait for the target too (always
    converges, costs write latency); the default copies changes in the background.
    On failure the jobs and NBD client nodes are removed and MigrationFailed raised;
    the guest never stops running for this.
    """
    parts = urlsplit(nbd_uri)
    if parts.scheme != "nbd" or parts.hostname is None or parts.port is None:
        raise ValueError(f"not an nbd://HOST:PORT uri: {nbd_uri}")
    waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
    ready: dict[str, asyncio.Future[dict[str, Any]]] = {}
    try:
        if tls_creds_dir is not None:
            await _tls_object(process, Path(tls_creds_dir), "client")
        for node in disks:
            job = _mig_id(node)
            nbd: dict[str, Any] = {
                "driver": "nbd", "node-name": job, "export": node,
                "server": {"type": "inet", "host": parts.hostname, "port": str(parts.port)}}
            if tls_creds_dir is not None:
                nbd["tls-creds"] = TLS_OBJECT_ID
                nbd["tls-hostname"] = tls_hostname or parts.hostname
            await _execute(process, "blockdev-add", nbd)
            # a job that ends before it is ready failed (auto-dismiss removes it)
            waiters[job] = _job_end_waiter(process, job)
            ready[job] = process.expect_event("BLOCK_JOB_READY",
                                              lambda d, j=job: d.get("device") == j)
            mirror: dict[str, Any] = {"job-id": job, "device": node, "target": job,
                                      "sync": "full", "copy-mode": copy_mode}
            if speed:
                mirror["speed"] = speed
            await _execute(process, "blockdev-mirror", mirror)
        await _wait_mirrors_ready(process, waiters, on_progress, timeout, ready)
    except BaseException as exc:
        await cancel_mirror(process)
        if isinstance(exc, (VmError, asyncio.TimeoutError)):
            raise MigrationFailed(f"copying the disks failed: {_message(exc)}") from exc
        raise
    finally:
        for future in (*waiters.values(), *ready.values()):
            future.cancel()


def _job_end_waiter(process: QemuProcess, job: str) -> "asyncio.Future[dict[str, Any]]":
    """A future for the first COMPLETED/CANCELLED/ERROR... event that ends ``job``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    futures = [process.expect_event(name, lambda d, j=job: d.get("device") == j)
               for name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]

    def settle(name: str, future: asyncio.Future[dict[str, Any]]) -> None:
        if future.cancelled() or done.done():
            return
        done.set_result({"event": name, **future.result()})

    for name, future in zip(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), futures):
        future.add_done_callback(lambda f, n=name: settle(n, f))
    done.add_done_callback(lambda _: [f.cancel() for f in futures])
    return done


async def _wait_mirrors_ready(process: QemuProcess,
                              waiters: dict[str, asyncio.Future[dict[str, Any]]],
                              on_progress: ProgressCallback | None, timeout: float,
                              ready: dict[str, asyncio.Future[dict[str, Any]]] | None = None
                              ) -> None:
    """Wait for every job's BLOCK_JOB_READY (or a query showing it ready), reporting
    progress every POLL_INTERVAL_S; a job that ends first is a failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ready = ready or {}
    while True:
        for job, future in waiters.items():
            if future.done():
                event = future.result()
                raise MigrationFailed(f"disk mirror {job} ended before it was in sync:"
                                      f" {event.get('error') or event['event']}")
        if process.exited:
            raise MigrationFailed("the source QEMU exited while copying the disks")
        jobs = {j["device"]: j for j in await _mig_jobs(process)}
        total, remaining = _disk_progress(jobs.values())
        done = all(jobs.get(job, {}).get("ready") or
                   (job in ready and ready[job].done()) for job in waiters)
        _emit(on_progress, MigrationProgress(
            status="mirroring", passes=0, ram_remaining=0, ram_total=0, dirty_rate=0,
            disk_remaining=0 if done else remaining, disk_total=total, eta_s=None,
            transferred=total if done else total - remaining, downtime_limit_ms=0))
        if done:
            return
        if loop.time() >= deadline:
            raise MigrationFailed(f"disk mirrors not in sync after {timeout:g} s"
                                  f" ({remaining >> 20} MiB left)")
        pending = {f for f in (*ready.values(), *waiters.values()) if not f.done()}
        await asyncio.wait(pending, timeout=POLL_INTERVAL_S,
                           return_when=asyncio.FIRST_COMPLETED)


async def finish_mirror(process: QemuProcess, *,
                        timeout: float = MIRROR_FINISH_TIMEOUT_S) -> None:
    """Complete every ready mirror without pivoting (``block-job-cancel`` on a ready
    job = final sync, the source stays on its own image), then drop the NBD client
    nodes. Call with the guest paused. MigrationFailed when a target is not in sync."""
    jobs = await _mig_jobs(process)
    waiters = {j["device"]: _job_end_waiter(process, j["device"]) for j in jobs}
    try:
        for job in jobs:
            if not job.get("ready"):
                raise MigrationFailed(f"disk mirror {job['device']} is not in sync"
                                      f" (status {job.get('status')})")
            await _execute(process, "block-job-cancel", {"device": job["device"]})
        for job, future in waiters.items():
            event = await asyncio.wait_for(future, timeout)
            if event["event"] != "BLOCK_JOB_COMPLETED" or event.get("error"):
                raise MigrationFailed(f"disk mirror {job} did not finish in sync:"
                                      f" {event.get('error') or event['event']}")
    except asyncio.TimeoutError as exc:
        raise MigrationFailed(f"disk mirrors did not finish within {timeout:g} s") from exc
    finally:
        for future in waiters.values():
            future.cancel()
    for node in await _mig_nbd_nodes(process):
        await _execute(process, "blockdev-del", {"node-name": node})


async def cancel_mirror(process: QemuProcess, *, timeout: float = 30.0) -> None:
    """Stop our mirror jobs (the source keeps its own image) and drop the NBD nodes;
    best effort, idempotent: used on every failure path."""
    if process.exited or not process.qmp.connected:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        for job in await _mig_jobs(process):
            try:
                await _execute(process, "block-job-cancel", {"device": job["device"],
                                                             "force": True})
            except QmpError as exc:
                log.debug("block-job-cancel %s: %s", job["device"], exc.message)
        while await _mig_jobs(process) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for node in await _mig_nbd_nodes(process):
            try:
                await _execute(process, "blockdev-del", {"node-name": node})
            except QmpError as exc:
                log.warning("cannot remove NBD node %s: %s", node, exc.message)
    except VmError as exc:
        log.warning("cleaning up disk mirrors failed: %s", exc.message)


# --- source --------------------------------------------------------------------------------
async def migrate_out(process: QemuProcess, uri: str, policy: ConvergencePolicy, *,
                      on_progress: ProgressCallback | None = None,
                      cancelled: Callable[[], bool] | None = None,
                      mirroring: bool = False, tls_creds_dir: Path | None = None,
                      tls_hostname: str | None = None,
                      on_postcopy: Callable[[], Awaitable[None]] | None = None
                      ) -> MigrationResult:
    """Send the running VM to the destination listening at ``uri``.

    Success: the source is paused (``postmigrate``) and the result says how it went.
    ``MigrationCancelled`` (``cancelled()`` turned True) / ``MigrationFailed`` (QEMU,
    link or destination failed, policy abort, timeout) are raised once the source runs
    again if it ran before. With ``mirroring`` the disk mirrors of ``mirror_disks``
    must be ready; they are completed at the switchover (see the module docstring).

    Post-copy (``policy.postcopy``, started by the policy when pre-copy cannot
    converge): from then on the VM can only run on the destination, which is paused
    (``-S``) until resumed. ``on_postcopy`` is awaited once when post-copy starts: the
    caller switches ownership there and has the destination call
    ``resume_incoming(dest, postcopy=True)``; the rest of the memory follows on demand
    and this function returns when it is all across. Without ``on_postcopy`` the guest
    stays paused until completion (safe, but the whole post-copy phase is downtime).
    """
    try:
        was_running = (await process.query_status()).running
        current = MigrationSample.from_reply(await _execute(process, "query-migrate"))
    except VmError as exc:
        raise MigrationFailed(f"source QEMU does not answer: {exc.message}") from exc
    if current.status in ACTIVE_STATUSES:
        raise MigrationFailed(f"a migration of this QEMU is already {current.status}")
    state = ConvergenceState.initial(policy)
    try:
        await _configure_source(process, policy, state, mirroring=mirroring,
                                tls_creds_dir=tls_creds_dir,
                                tls_hostname=tls_hostname or uri_host(uri))
        await _execute(process, "migrate", {"uri": uri})
    except VmError as exc:
        await _restore_source(process, was_running, mirroring)
        raise MigrationFailed(f"cannot start the migration: {exc.message}") from exc
    log.info("migration: source pid %d -> %s started", process.pid, uri)
    try:
        final, state = await _follow(process, policy, state, on_progress, cancelled,
                                     mirroring, on_postcopy)
    except (MigrationFailed, MigrationCancelled) as exc:
        await _restore_source(process, was_running, mirroring)
        log.warning("migration: source pid %d: %s", process.pid, exc.message)
        raise
    except VmError as exc:
        await _restore_source(process, was_running, mirroring)
        raise MigrationFailed(f"lost the source QEMU during migration: {exc.message}") from exc
    except BaseException:
        # our own task was cancelled (service shutting down): leave no migration behind
        await asyncio.shield(_restore_source(process, was_running, mirroring))
        raise
    final = await _settle_postmigrate(process, final)
    result = MigrationResult(
        total_time_ms=int(final.elapsed_s * 1000), downtime_ms=int(final.downtime_ms or 0),
        transferred_bytes=final.ram_transferred, setup_time_ms=final.setup_time_ms,
        passes=final.dirty_sync_count, downtime_limit_ms=state.downtime_limit_ms,
        auto_converge=state.auto_converge, postcopy=state.postcopy_started)
    log.info("migration: source pid %d done: %s", process.pid, result)
    return result


async def _settle_postmigrate(process: QemuProcess, final: MigrationSample,
                              timeout: float = 5.0) -> MigrationSample:
    """QEMU reports ``completed`` a moment before its run state leaves
    ``finish-migrate`` and before it fills in total-time and downtime: return only once
    the source is settled in ``postmigrate``, with the final numbers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            settled = (await process.query_status()).status != "finish-migrate"
            if settled and final.downtime_ms is not None and final.elapsed_s > 0:
                return final
            if loop.time() >= deadline:
                log.warning("migration: source pid %d not settled after completion",
                            process.pid)
                return final
            await asyncio.sleep(0.005)
            final = MigrationSample.from_reply(await _execute(process, "query-migrate"))
    except VmError as exc:
        log.warning("migration: source pid %d after completion: %s", process.pid,
                    exc.message)
        return final


async def _configure_source(process: QemuProcess, policy: ConvergencePolicy,
                            state: ConvergenceState, *, mirroring: bool,
                            tls_creds_dir: Path | None, tls_hostname: str) -> None:
    await _set_capabilities(process, _capabilities(policy, source=True, mirroring=mirroring))
    params: dict[str, Any] = {
        "downtime-limit": state.downtime_limit_ms,
        "max-bandwidth": policy.bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH,
        "tls-creds": "", "tls-hostname": ""}
    if policy.postcopy:     # post-copy has its own cap (QEMU default 0: unlimited)
        params["max-postcopy-bandwidth"] = policy.bandwidth_bytes_per_s or 0
    if policy.xbzrle:
        params["xbzrle-cache-size"] = policy.xbzrle_cache_bytes
    if policy.multifd_channels:
        params["multifd-channels"] = policy.multifd_channels
    if policy.auto_converge_after is not None:
        params.update(THROTTLE_ON if state.auto_converge else THROTTLE_ARMED)
    if tls_creds_dir is not None:
        params["tls-creds"] = await _tls_object(process, Path(tls_creds_dir), "client")
        params["tls-hostname"] = tls_hostname
    await _set_parameters(process, params)


async def _follow(process: QemuProcess, policy: ConvergencePolicy, state: ConvergenceState,
                  on_progress: ProgressCallback | None, cancelled: Callable[[], bool] | None,
                  mirroring: bool, on_postcopy: Callable[[], Awaitable[None]] | None = None,
                  ) -> tuple[MigrationSample, ConvergenceState]:
    """Poll query-migrate until the end, applying the policy; raises on failure."""
    postcopy_notified = False
    wake: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            if wake is None or wake.done():
                wake = process.expect_event("MIGRATION", _wakes_follow)
            sample, state, postcopy_notified, done = await _follow_once(
                process, policy, state, on_progress, cancelled, mirroring, on_postcopy,
                postcopy_notified)
            if done:
                return sample, state
            # the MIGRATION event (capability "events") ends the wait at once on
            # completion: the switchover latency is not a polling interval
            await asyncio.wait({wake}, timeout=POLL_INTERVAL_S)
    finally:
        if wake is not None:
            wake.cancel()


def _wakes_follow(data: dict[str, Any]) -> bool:
    return data.get("status") in ("completed", "failed", "cancelled", "pre-switchover",
                                  "postcopy-active")


async def _follow_once(process: QemuProcess, policy: ConvergencePolicy,
                       state: ConvergenceState, on_progress: ProgressCallback | None,
                       cancelled: Callable[[], bool] | None, mirroring: bool,
                       on_postcopy: Callable[[], Awaitable[None]] | None,
                       postcopy_notified: bool
                       ) -> tuple[MigrationSample, ConvergenceState, bool, bool]:
    """One poll: (sample, state, post-copy hook called, finished)."""
    if process.exited:
        raise MigrationFailed("the source QEMU exited during migration")
    sample = MigrationSample.from_reply(await _execute(process, "query-migrate"))
    if sample.status == "completed":
        _emit(on_progress, _progress(sample, state, None))
        return sample, state, postcopy_notified, True
    if sample.status in ("failed", "cancelled"):
        raise MigrationFailed(f"QEMU reports the migration {sample.status}:"
                              f" {sample.error or 'no reason given'}")
    in_postcopy = sample.status in POSTCOPY_STATUSES
    if in_postcopy and not postcopy_notified:
        postcopy_notified = True
        state = dataclasses.replace(state, postcopy_started=True)
        if on_postcopy is not None:
            try:
                await on_postcopy()
            except Exception:      # post-copy cannot be undone: finish it anyway
                log.exception("migration: the post-copy hook failed")
    if cancelled is not None and cancelled():
        if not in_postcopy:
            raise MigrationCancelled("migration cancelled on request; the VM stays"
                                     " on the source")
        log.warning("migration in post-copy cannot be cancelled: finishing it")
    if sample.status == "pre-switchover":
        await _switchover(process, mirroring)
        return sample, state, postcopy_notified, False
    state, actions = next_action(policy, state, sample)
    for action in actions:
        await _apply(process, action)
    disks = _disk_progress(await _mig_jobs(process)) if mirroring else (0, 0)
    _emit(on_progress, _progress(sample, state, disks))
    return sample, state, postcopy_notified, False


def _progress(sample: MigrationSample, state: ConvergenceState,
              disks: tuple[int, int] | None) -> MigrationProgress:
    disk_total, disk_remaining = disks or (0, 0)
    return MigrationProgress(
        status=sample.status, passes=sample.dirty_sync_count,
        ram_remaining=sample.ram_remaining, ram_total=sample.ram_total,
        dirty_rate=sample.dirty_rate_bytes_per_s,
        disk_remaining=disk_remaining + sample.disk_remaining,
        disk_total=disk_total + sample.disk_total, eta_s=eta_s(sample),
        transferred=sample.ram_transferred, downtime_limit_ms=state.downtime_limit_ms)


async def _switchover(process: QemuProcess, mirroring: bool) -> None:
    """The source is paused before sending the device state: finish the disk mirrors,
    then let the migration complete."""
    if mirroring:
        await finish_mirror(process)
    await _execute(process, "migrate-continue", {"state": "pre-switchover"})


async def _apply(process: QemuProcess, action: Any) -> None:
    if isinstance(action, SetDowntime):
        log.info("migration: raising the downtime limit to %d ms", action.ms)
        await _set_parameters(process, {"downtime-limit": action.ms})
    elif isinstance(action, EnableAutoConverge):
        log.info("migration: throttling the guest's vCPUs (auto-converge)")
        await _set_parameters(process, THROTTLE_ON)
    elif isinstance(action, StartPostcopy):
        log.warning("migration: switching to post-copy (the VM is lost if the link or"
                    " the destination fails from now on)")
        await _execute(process, "migrate-start-postcopy")
    elif isinstance(action, Abort):
        raise MigrationFailed(action.reason)


async def _cancel_and_wait(process: QemuProcess, timeout: float = CANCEL_TIMEOUT_S) -> str:
    """``migrate_cancel`` and wait until QEMU says the migration ended; its status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        await _execute(process, "migrate_cancel")
    except QmpError as exc:
        log.debug("migrate_cancel: %s", exc.message)
    while True:
        status = MigrationSample.from_reply(await _execute(process, "query-migrate")).status
        if status in POSTCOPY_STATUSES:
            return status   # cannot be cancelled; the caller must not resume the source
        if status not in ACTIVE_STATUSES:
            return status
        if loop.time() >= deadline:
            return status
        await asyncio.sleep(0.05)


async def _restore_source(process: QemuProcess, was_running: bool, mirroring: bool) -> str:
    """After a failed/cancelled attempt: no migration, no mirror, default settings, and
    running again if it ran before. Returns what was done (for logs)."""
    done: list[str] = []
    if process.exited or not process.qmp.connected:
        return "source QEMU is gone"
    try:
        status = MigrationSample.from_reply(await _execute(process, "query-migrate")).status
        if status in POSTCOPY_STATUSES:
            return f"migration is in {status}: the source must not be resumed"
        if status in ACTIVE_STATUSES:
            status = await _cancel_and_wait(process)
            done.append(f"cancelled the migration ({status})")
        if mirroring or await _mig_jobs(process) or await _mig_nbd_nodes(process):
            await cancel_mirror(process)
            done.append("stopped the disk mirrors")
        await _reset_settings(process)
        run = await process.query_status()
        if was_running and not run.running and run.status in (
                "postmigrate", "paused", "finish-migrate"):
            await process.resume()
            done.append(f"resumed the VM (was {run.status})")
        elif not was_running:
            done.append(f"left the VM {run.status} (paused before the migration)")
    except VmError as exc:
        done.append(f"could not finish the clean-up: {exc.message}")
        log.error("migration: source pid %d clean-up failed: %s", process.pid, exc.message)
    return "; ".join(done) or "nothing to do"


async def recover_source(process: QemuProcess, *, was_running: bool) -> str:
    """For a source service restarted mid-migration: cancel an active migration, drop
    disk mirrors, and ``cont`` a VM left paused by the migration, but only when it was
    running before (``was_running`` from the caller's records). Returns what was done.

    Call it only while the cluster still records the source as the VM's owner: after
    the ownership switch the destination is the VM, and resuming the source too would
    run it twice. A migration in post-copy is left alone (the VM runs on the
    destination)."""
    if process.exited:
        return "source QEMU is gone"
    try:
        status = MigrationSample.from_reply(await _execute(process, "query-migrate")).status
        run = await process.query_status()
    except VmError as exc:
        return f"source QEMU does not answer: {exc.message}"
    prefix = f"migration {status}, VM {run.status}: "
    return prefix + await _restore_source(process, was_running, mirroring=False)


def _message(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


__all__ = [
    "MigrationProgress", "MigrationResult", "free_port", "tcp_uri", "mirrored_nodes",
    "reset_migration_settings", "prepare_incoming", "export_disks", "stop_export",
    "resume_incoming", "abort_incoming",
    "mirror_disks", "finish_mirror", "cancel_mirror", "migrate_out", "recover_source",
]
