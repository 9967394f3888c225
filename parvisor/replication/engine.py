"""The QEMU side of disk replication on the primary host (engine only: the protocol and
cluster decisions live in ``parvisor.replication.protocol``; the replica's side is
``parvisor.replication.target.ReplicaTarget``).

Synchronous mode (RPO 0)::

    rep = await start_sync(process, "fmt-vdb", target.nbd_uri, export="disk",
                           tls_dir=tls, stall_limit_s=5.0)
    await rep.status()                  # ReplicationProgress: initial-sync -> in-sync
    await rep.wait_in_sync(timeout)
    # the replica stops answering: after stall_limit_s the engine awaits
    # before_release(reason) (the protocol commits "broken"), then cuts the link; the
    # VM carries on alone, state "broken" (guest writes are recorded in bitmaps)
    await rep.resync(target.nbd_uri)    # incremental when possible, else a full copy
    await rep.stop()                    # no replication any more (bitmaps removed)

``blockdev-mirror`` with ``copy-mode=write-blocking`` from the disk's format node into
an NBD client node: a guest write completes only once it is on the replica (the replica
exports ``writethrough``, so it is on its disk too).

The stall limit: QEMU 7.2's NBD client has no request timeout (``reconnect-delay`` and
``open-timeout`` only apply while *connecting*) and its inet address has ``keep-alive``
but no idle/user-timeout knobs, so a peer that is stopped while its kernel still ACKs
(or a link that drops packets) would block guest writes forever. The engine therefore
makes the TCP connection itself (keep-alive, no Nagle), hands it to
QEMU (``getfd`` + an ``fd`` socket address) and keeps a duplicate. A supervisor polls the
socket's TCP_INFO: when a request has been out (data sent after the last data received)
for the stall limit, it shuts the socket down. QEMU's NBD client (``reconnect-delay=0``)
then fails the in-flight requests, the mirror (``on-target-error=report``) ends with an
error, and the guest's blocked writes complete from the source alone.

While replicating, two persistent dirty bitmaps (``repl-a``/``repl-b``) record guest
writes. Only while the mirror is in sync, one of them is cleared every ``rotation_s``
(> 4 stall limits): at any break their union covers every write not on the replica (a
write in flight at the break started less than a stall limit ago). If the mirror never
reached in-sync, the resync is a full copy (a new ``sync=full`` mirror).

Incremental resync: QEMU 7.2's ``blockdev-mirror`` takes no bitmap, and a running
mirror blocks every backup job on its node ("in use by block job: mirror"), so the recorded blocks
cannot be copied while a ``sync=none`` mirror already carries new writes. Instead: the
union goes into ``repl-a``; rounds of ``blockdev-backup sync=bitmap`` with
``bitmap-mode=on-success`` (each ships the blocks as of its start; writes during it
stay recorded; a failed round loses nothing) until at most ``RESYNC_PAUSED_BYTES`` are
left (or ``RESYNC_MAX_ROUNDS``); then the guest is paused (if it ran), the last round
ships the rest, the ``sync=none`` write-blocking mirror starts and the guest resumes.
No write can fall between the last round and the mirror, and no old block can reach
the replica after a newer one (each round's copy of a block precedes the next round's).
``rep.last_resync_pause_s`` is that pause, ``rep.resync_shipped`` the bytes sent.

Asynchronous mode, one cycle (the replica's image is the last complete cycle)::

    uri = await target.begin_cycle()                  # replica: a fresh overlay
    report = await run_async_cycle(process, "fmt-vdb", uri, spool_dir=d, export="disk")
    await target.commit_cycle()                       # replica: overlay -> image
    await confirm_async_cycle(process, "fmt-vdb")     # primary: forget shipped blocks
    # on any failure: await target.abort_cycle()  (run_async_cycle already kept the
    # changes for the next cycle; abandon_async_cycle does it for a failed commit)
    await stop_async(process, "fmt-vdb")              # the end: bitmaps dropped

Persistent bitmaps ``repl-async-<n>``: a cycle atomically (``transaction``) starts
bitmap n+1, freezes bitmap n and copies n's blocks as of that instant into a local
spool image (``spool_dir``); only then is the spool's content (``sync=top``) shipped.
Guest writes therefore never wait for the network (a direct backup into the NBD node
would put its copy-before-write filter between the guest and a possibly stuck
replica). Bitmap n is deleted only once the replica committed (``confirm``), otherwise
merged into n+1 (``abandon``, also done at the next cycle's start): no change is lost.
The first cycle ships everything.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from parvisor.errors import InvalidInput, QmpError, ReplicationFailed, VmError
from parvisor.migration.engine import TLS_OBJECT_ID, _tls_object
from parvisor.storage.qemu_img import create_image
from parvisor.vm.process import QemuProcess

log = logging.getLogger(__name__)

DEFAULT_STALL_LIMIT_S = 5.0
POLL_S = 0.1
BITMAPS = ("repl-a", "repl-b")
ASYNC_PREFIX = "repl-async-"
RESYNC_BITMAP = "repl-resync"        # of earlier versions; removed on stop
RESYNC_MAX_ROUNDS = 5
RESYNC_PAUSED_BYTES = 4 << 20      # what is left for the paused final round (at most)
RESYNC_ROUND_TIMEOUT_S = 3600.0
JOB_END_TIMEOUT_S = 30.0
# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s; the two we need:
TCPI_LAST_DATA_SENT, TCPI_LAST_DATA_RECV = 44, 52

ReleaseHook = Callable[[str], Awaitable[bool]]
STATES = ("initial-sync", "in-sync", "resyncing", "broken", "stopped")


# --- pure parts -------------------------------------------------------------------------
@dataclass(frozen=True)
class ConsistentPoint:
    """A moment the replica holds: monotonic for arithmetic, wall time for display."""

    monotonic: float
    wall: float


@dataclass(frozen=True)
class ReplicationProgress:
    state: str
    bytes_total: int
    bytes_done: int
    bytes_behind: int
    last_consistent_at: ConsistentPoint | None
    error: str | None = None


@dataclass(frozen=True)
class CycleReport:
    bytes_shipped: int
    consistent_at: ConsistentPoint
    duration_s: float
    full: bool


def parse_nbd_uri(uri: str) -> tuple[str, int]:
    parts = urlsplit(uri)
    if parts.scheme != "nbd" or not parts.hostname or parts.port is None:
        raise InvalidInput(f"not an nbd://HOST:PORT uri: {uri}")
    return parts.hostname, parts.port


def check_stall_limit(stall_limit_s: float) -> float:
    if not 0.5 <= stall_limit_s <= 300:
        raise InvalidInput(f"stall limit must be 0.5..300 s, not {stall_limit_s}")
    return float(stall_limit_s)


def rotation_period(stall_limit_s: float) -> float:
    """How often one bitmap is cleared while in sync: well over a stall limit, so a
    write in flight at a clear is always in the other bitmap."""
    return max(30.0, 4 * stall_limit_s)


def job_progress(state: str, job: dict[str, Any] | None, *,
                 consistent: ConsistentPoint | None, error: str | None = None
                 ) -> ReplicationProgress:
    """Progress from a ``query-block-jobs`` entry (None: no job)."""
    total = int(job.get("len", 0)) if job else 0
    done = int(job.get("offset", 0)) if job else 0
    behind = 0 if state == "in-sync" else max(0, total - done)
    return ReplicationProgress(state, total, done, behind, consistent, error)


@dataclass
class StallWatch:
    """Is a request to the replica unanswered, and since when (pure; fed TCP_INFO).

    A request is out when data was sent after the last data received (NBD answers
    every request). The start is taken conservatively (never late): the previous poll
    that saw nothing out, or the last reply while requests keep being out."""

    since: float | None = None
    last_poll: float | None = None
    recv_at: float | None = None

    def observe(self, now: float, sent_ago_s: float, recv_ago_s: float) -> float:
        """Seconds the oldest outstanding request may have waited (0: none out)."""
        recv_at = now - recv_ago_s
        outstanding = sent_ago_s < recv_ago_s
        previous_poll, self.last_poll = self.last_poll, now
        if not outstanding:
            self.since = self.recv_at = None
            return 0.0
        if self.since is None:          # nothing was out at the previous poll
            floor = previous_poll if previous_poll is not None else now - sent_ago_s
            self.since = max(recv_at, min(floor, now - sent_ago_s))
        elif self.recv_at is not None and recv_at > self.recv_at + 0.05:
            self.since = recv_at        # still busy, but it answered: alive until then
        self.recv_at = recv_at
        return now - self.since


@dataclass
class BitmapRotation:
    """Which of the two bitmaps to clear next, and when (pure)."""

    period_s: float
    cleared_at: dict[str, float] = field(default_factory=dict)

    def due(self, now: float, in_sync_since: float | None) -> str | None:
        if in_sync_since is None:
            return None
        oldest = min(BITMAPS, key=lambda b: self.cleared_at.get(b, in_sync_since))
        other = BITMAPS[1 - BITMAPS.index(oldest)]
        # the other bitmap must have been recording for a full period (since in sync)
        other_since = max(self.cleared_at.get(other, in_sync_since), in_sync_since)
        if now - other_since >= self.period_s and \
                now - self.cleared_at.get(oldest, in_sync_since) >= self.period_s:
            return oldest
        return None

    def mark(self, name: str, now: float) -> None:
        self.cleared_at[name] = now


def async_generations(bitmap_names: list[str]) -> list[int]:
    return sorted(int(n[len(ASYNC_PREFIX):]) for n in bitmap_names
                  if n.startswith(ASYNC_PREFIX) and n[len(ASYNC_PREFIX):].isdigit())


def tcp_info_times(info: bytes) -> tuple[float, float]:
    """(seconds since data was last sent, since data was last received)."""
    sent, = struct.unpack_from("I", info, TCPI_LAST_DATA_SENT)
    recv, = struct.unpack_from("I", info, TCPI_LAST_DATA_RECV)
    return sent / 1000.0, recv / 1000.0


# --- the link: our own TCP connection, handed to QEMU ---------------------------------------
class Link:
    """One TCP connection to the replica's NBD server; QEMU gets it, we keep a dup."""

    def __init__(self, sock: socket.socket, stall_limit_s: float) -> None:
        self.sock = sock
        self.watch = StallWatch()
        self.stall_limit_s = stall_limit_s
        self.cut = False

    @classmethod
    async def open(cls, host: str, port: int, stall_limit_s: float) -> "Link":
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        # No TCP_USER_TIMEOUT: the kernel would then fail the requests of a dead link
        # by itself and let the guest's writes go on before the protocol committed
        # "broken" (before_release); the supervisor decides that alone.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), stall_limit_s)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            raise ReplicationFailed(f"cannot reach the replica at {host}:{port}: "
                                    f"{exc or 'timed out'}") from exc
        return cls(sock, stall_limit_s)

    def stalled_for(self, now: float) -> float:
        if self.cut:
            return 0.0
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return 0.0
        return self.watch.observe(now, *tcp_info_times(info))

    def shut(self) -> None:
        """Cut the connection under QEMU: its pending NBD requests fail at once."""
        self.cut = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


async def _execute(process: QemuProcess, command: str, arguments: dict[str, Any] | None = None
                   ) -> Any:
    return await process.qmp.execute(command, arguments)


async def _add_nbd_node(process: QemuProcess, node: str, link: Link, export: str,
                        host: str, tls_dir: Path | None) -> None:
    fd_name = f"{node}-fd"
    await process.qmp.send_fd(link.sock.fileno(), fd_name)
    spec: dict[str, Any] = {"driver": "nbd", "node-name": node, "export": export,
                            "server": {"type": "fd", "str": fd_name},
                            "reconnect-delay": 0}
    if tls_dir is not None:
        await _tls_object(process, Path(tls_dir), "client")
        spec["tls-creds"] = TLS_OBJECT_ID
        spec["tls-hostname"] = host
    # the NBD handshake runs inside blockdev-add and has no timeout of its own: a peer
    # that accepted but does not answer would hold it (and QEMU's monitor) forever
    adding = asyncio.ensure_future(_execute(process, "blockdev-add", spec))
    done, _ = await asyncio.wait({adding}, timeout=link.stall_limit_s)
    if not done:
        link.shut()
    try:
        await adding
    except QmpError as exc:
        raise ReplicationFailed(f"cannot open the replica's NBD export {export!r}: "
                                f"{exc.message}") from exc


async def _del_node(process: QemuProcess, node: str) -> None:
    try:
        await _execute(process, "blockdev-del", {"node-name": node})
    except QmpError as exc:
        log.debug("blockdev-del %s: %s", node, exc.message)


async def _jobs(process: QemuProcess) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in await _execute(process, "query-block-jobs")}


async def _bitmaps(process: QemuProcess, node: str) -> list[dict[str, Any]]:
    for entry in await _execute(process, "query-named-block-nodes", {"flat": True}):
        if entry.get("node-name") == node:
            # the mirror's own bitmap is anonymous: only named ones are ours to manage
            return [b for b in entry.get("dirty-bitmaps", []) if b.get("name")]
    raise InvalidInput(f"no block node {node!r} in this VM")


async def _node_format(process: QemuProcess, node: str) -> str:
    return (await _node_info(process, node))[0]


async def _node_info(process: QemuProcess, node: str) -> tuple[str, int]:
    """(driver, virtual size) of a block node."""
    for entry in await _execute(process, "query-named-block-nodes", {"flat": True}):
        if entry.get("node-name") == node:
            return str(entry.get("drv")), int(entry.get("image", {}).get("virtual-size", 0))
    raise InvalidInput(f"no block node {node!r} in this VM")


async def _cancel_job(process: QemuProcess, job: str, timeout: float = JOB_END_TIMEOUT_S
                      ) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        await _execute(process, "block-job-cancel", {"device": job, "force": True})
    except QmpError:
        pass        # already gone
    while job in await _jobs(process):
        if loop.time() >= deadline:
            raise ReplicationFailed(f"block job {job} did not end after cancel")
        await asyncio.sleep(0.02)


def _job_end(process: QemuProcess, job: str) -> "asyncio.Future[dict[str, Any]]":
    """The first COMPLETED/CANCELLED event of ``job`` (with ``event`` added)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    futures = {name: process.expect_event(name, lambda d: d.get("device") == job)
               for name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")}
    for name, fut in futures.items():
        fut.add_done_callback(lambda f, n=name: None if f.cancelled() or done.done()
                              else done.set_result({"event": n, **f.result()}))
    done.add_done_callback(lambda _: [f.cancel() for f in futures.values()])
    return done


# --- synchronous mode -------------------------------------------------------------------
class SyncReplication:
    """One disk of one VM replicated synchronously. Create with ``start_sync``."""

    def __init__(self, process: QemuProcess, node: str, export: str, tls_dir: Path | None,
                 stall_limit_s: float, persistent: bool,
                 before_release: ReleaseHook | None = None) -> None:
        self.process = process
        self.before_release = before_release
        self.node = node
        self.export = export
        self.tls_dir = tls_dir
        self.stall_limit_s = stall_limit_s
        self.persistent = persistent
        self.mirror_job = f"rpl-m-{node}"
        self.backup_job = f"rpl-b-{node}"
        self.nbd_nodes = (f"rpl-n-{node}",)
        self.state = "stopped"
        self.error: str | None = None
        self.links: list[Link] = []
        self.ever_in_sync = False
        self.in_sync_since: float | None = None
        self.broken_at: float | None = None
        self.consistent_until: ConsistentPoint | None = None
        self.rotation = BitmapRotation(rotation_period(stall_limit_s))
        self._supervisor: asyncio.Task[None] | None = None
        self._resync: asyncio.Task[None] | None = None
        self.resync_shipped = 0
        self.last_resync_pause_s: float | None = None

    # --- status ------------------------------------------------------------------------
    async def status(self) -> ReplicationProgress:
        jobs = await _jobs(self.process) if self.process.qmp.connected else {}
        job = jobs.get(self.backup_job) or jobs.get(self.mirror_job)
        consistent = None
        if self.state == "in-sync":
            consistent = ConsistentPoint(time.monotonic(), time.time())
        elif self.state == "broken":
            consistent = self.consistent_until     # None: never was in sync
        return job_progress(self.state, job, consistent=consistent, error=self.error)

    async def wait_in_sync(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.state != "in-sync":
            if self.state in ("broken", "stopped"):
                raise ReplicationFailed(f"replication {self.state}: {self.error}")
            if loop.time() >= deadline:
                raise ReplicationFailed(f"not in sync after {timeout:g} s")
            await asyncio.sleep(POLL_S / 2)

    # --- starting ------------------------------------------------------------------------
    async def _ensure_bitmaps(self) -> None:
        present = {b["name"] for b in await _bitmaps(self.process, self.node)}
        for name in BITMAPS:
            if name not in present:
                await _execute(self.process, "block-dirty-bitmap-add", {
                    "node": self.node, "name": name, "persistent": self.persistent})

    async def _connect(self, uri: str, count: int) -> None:
        host, port = parse_nbd_uri(uri)
        for node in self.nbd_nodes[:count]:
            link = await Link.open(host, port, self.stall_limit_s)
            self.links.append(link)
            await _add_nbd_node(self.process, node, link, self.export, host, self.tls_dir)

    async def _start_mirror(self, sync: str) -> None:
        await _execute(self.process, "blockdev-mirror", {
            "job-id": self.mirror_job, "device": self.node, "target": self.nbd_nodes[0],
            "sync": sync, "copy-mode": "write-blocking", "on-target-error": "report",
            "on-source-error": "report"})

    async def _full(self, uri: str) -> None:
        self.state = "initial-sync"
        self.in_sync_since = None
        await self._connect(uri, 1)
        await self._start_mirror("full")
        self._supervise()

    async def _incremental(self, uri: str) -> None:
        """Copy the recorded blocks in rounds while the guest runs, then the last few
        with the guest paused, and start the synchronous mirror before it resumes.

        Why the pause: QEMU 7.2's blockdev-mirror takes no bitmap, and a running mirror
        blocks any backup job on the same node, so the recorded blocks cannot be copied
        while a ``sync=none`` mirror carries new writes. Each round ships the bitmap's
        blocks as of the round's start (``bitmap-mode=on-success``: writes during the
        round stay recorded, a failed round loses nothing); the final round runs with
        no guest writes at all, so nothing can slip between it and the mirror."""
        self.state = "resyncing"
        self.in_sync_since = None
        await self._connect(uri, 1)
        a, b = BITMAPS
        await _execute(self.process, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-merge", "data": {
                "node": self.node, "target": a, "bitmaps": [b]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": self.node, "name": b}}]})
        self._resync = asyncio.ensure_future(self._resync_rounds())

    async def _recorded_bytes(self) -> int:
        for bitmap in await _bitmaps(self.process, self.node):
            if bitmap["name"] == BITMAPS[0]:
                return int(bitmap.get("count", 0))
        return 0

    async def _resync_rounds(self) -> None:
        try:
            for _ in range(RESYNC_MAX_ROUNDS):
                if await self._recorded_bytes() <= RESYNC_PAUSED_BYTES:
                    break
                await self._backup_round()
            await self._final_round()
        except asyncio.CancelledError:
            raise
        except ReplicationFailed as exc:
            await self._break(exc.message)
        except VmError as exc:
            await self._break(f"resync failed: {exc.message}")

    async def _backup_round(self) -> None:
        ended = _job_end(self.process, self.backup_job)
        try:
            await _execute(self.process, "blockdev-backup", {
                "job-id": self.backup_job, "device": self.node,
                "target": self.nbd_nodes[0], "sync": "bitmap", "bitmap": BITMAPS[0],
                "bitmap-mode": "on-success", "on-target-error": "report",
                "on-source-error": "report"})
            event = await _follow_job(ended, self.links[0], self.stall_limit_s,
                                      RESYNC_ROUND_TIMEOUT_S)
        finally:
            ended.cancel()
        if event["event"] != "BLOCK_JOB_COMPLETED" or event.get("error"):
            raise ReplicationFailed(f"resync failed: {event.get('error') or event['event']}")
        self.resync_shipped += int(event.get("offset", 0))

    async def _final_round(self) -> None:
        running = (await self.process.query_status()).running
        if running:
            await self.process.pause()
        paused_at = time.monotonic()
        try:
            await self._backup_round()
            await self._start_mirror("none")
        finally:
            if running:
                await self.process.resume()
            self.last_resync_pause_s = time.monotonic() - paused_at
        self._now_in_sync(time.monotonic())
        self._supervise()

    def _supervise(self) -> None:
        self._supervisor = asyncio.ensure_future(self._run_supervisor())

    # --- the supervisor ------------------------------------------------------------------
    async def _run_supervisor(self) -> None:
        try:
            while self.state in ("initial-sync", "in-sync", "resyncing"):
                await self._tick()
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            raise
        except VmError as exc:
            await self._break(f"lost QEMU's control channel: {exc.message}")
        except Exception as exc:     # never leave guest writes at the mercy of a bug
            log.exception("replication supervisor failed")
            await self._break(f"supervisor failed: {exc}")

    async def _tick(self) -> None:
        now = time.monotonic()
        for link in self.links:
            stalled = link.stalled_for(now)
            if stalled >= self.stall_limit_s:
                reason = (f"the replica did not answer for {stalled:.1f} s"
                          f" (limit {self.stall_limit_s:g} s)")
                if await self._may_release(reason):
                    await self._break(reason, stalled)
                return
        if self.process.exited:
            await self._break("the VM's QEMU exited")
            return
        jobs = await _jobs(self.process)
        mirror = jobs.get(self.mirror_job)
        if mirror is None or mirror.get("status") in ("concluded", "aborting"):
            await self._break(f"the mirror to the replica ended: "
                              f"{(mirror or {}).get('error') or 'target failed'}")
            return
        if mirror.get("ready") and self.state == "initial-sync":
            self._now_in_sync(now)
        if self.state == "in-sync":
            await self._rotate(now)

    async def _may_release(self, reason: str) -> bool:
        """Ask the caller (``before_release``: commit ``broken`` first) whether the
        stalled guest writes may go on without the replica; until it says so they stay
        stalled (asked again at the next poll)."""
        if self.before_release is None:
            return True
        try:
            return bool(await self.before_release(reason))
        except Exception:
            log.exception("replication of %s: before_release failed; writes stay stalled",
                          self.node)
            return False

    def _now_in_sync(self, now: float) -> None:
        self.state = "in-sync"
        self.ever_in_sync = True
        self.in_sync_since = now
        self.rotation = BitmapRotation(rotation_period(self.stall_limit_s))
        log.info("replication of %s: in sync", self.node)

    async def _rotate(self, now: float) -> None:
        name = self.rotation.due(now, self.in_sync_since)
        if name is not None:
            await _execute(self.process, "block-dirty-bitmap-clear",
                           {"node": self.node, "name": name})
            self.rotation.mark(name, now)

    async def _break(self, reason: str, stalled_s: float = 0.0) -> None:
        """Cut the links first (releases blocked guest writes), then clean up."""
        if self.state in ("broken", "stopped"):
            return
        log.warning("replication of %s broken: %s", self.node, reason)
        if self.state == "in-sync":
            # the replica has every write acknowledged before the stall began; during
            # a (re)sync it holds blocks of different times: no consistent point
            self.consistent_until = ConsistentPoint(time.monotonic() - stalled_s,
                                                    time.time() - stalled_s)
        else:
            self.consistent_until = None
        self.state, self.error, self.broken_at = "broken", reason, time.monotonic()
        self.in_sync_since = None
        for link in self.links:
            link.shut()
        await self._teardown()

    async def _teardown(self) -> None:
        if not self.process.exited and self.process.qmp.connected:
            jobs = await _jobs(self.process)
            for job in (self.backup_job, self.mirror_job):
                if job in jobs:
                    if jobs[job].get("status") == "concluded":
                        await _execute(self.process, "job-dismiss", {"id": job})
                    else:
                        await _cancel_job(self.process, job)
            for node in self.nbd_nodes:
                await _del_node(self.process, node)
        for link in self.links:
            link.close()
        self.links = []

    # --- after a break -------------------------------------------------------------------
    async def resync(self, uri: str) -> str:
        """Replicate again after a break; "incremental" or "full" (what was done)."""
        if self.state not in ("broken",):
            raise InvalidInput(f"resync needs a broken replication, this one is {self.state}")
        parse_nbd_uri(uri)
        kind = "incremental" if self.ever_in_sync else "full"
        try:
            await (self._incremental(uri) if self.ever_in_sync else self._full(uri))
        except BaseException as exc:
            # the replica is still unreachable: stay broken, with the recorded blocks
            self.state, self.error = "broken", f"resync failed: {_message(exc)}"
            await self._teardown()
            raise
        self.error = None
        return kind

    async def stop(self) -> None:
        """End replication: jobs cancelled, links closed, bitmaps removed."""
        tasks = [t for t in (self._supervisor, self._resync) if t is not None]
        self._supervisor = self._resync = None
        self.state = "stopped"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._teardown()
        if not self.process.exited and self.process.qmp.connected:
            for bitmap in (*BITMAPS, RESYNC_BITMAP):
                try:
                    await _execute(self.process, "block-dirty-bitmap-remove",
                                   {"node": self.node, "name": bitmap})
                except QmpError:
                    pass


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


async def start_sync(process: QemuProcess, disk_node: str, target_uri: str, *,
                     export: str = "disk", tls_dir: Path | None = None,
                     stall_limit_s: float = DEFAULT_STALL_LIMIT_S,
                     before_release: ReleaseHook | None = None) -> SyncReplication:
    """Start synchronous replication of ``disk_node`` (a format node, e.g. ``fmt-vdb``)
    into the replica's NBD export; returns at once (initial sync in the background).

    ``before_release(reason)`` is awaited when the replica stalls, before the guest's
    writes are let go without it: the protocol commits ``broken`` there and returns
    True (False or an exception: the writes stay stalled, asked again every poll)."""
    stall_limit_s = check_stall_limit(stall_limit_s)
    parse_nbd_uri(target_uri)
    fmt = await _node_format(process, disk_node)
    if (await _jobs(process)).get(f"rpl-m-{disk_node}"):
        raise InvalidInput(f"{disk_node} is already being replicated")
    rep = SyncReplication(process, disk_node, export, tls_dir, stall_limit_s,
                          persistent=(fmt == "qcow2"), before_release=before_release)
    await rep._ensure_bitmaps()
    try:
        await rep._full(target_uri)
    except BaseException:
        rep.state = "broken"
        await rep.stop()
        raise
    return rep


async def adopt_sync(process: QemuProcess, disk_node: str, target_uri: str, *,
                     export: str = "disk", tls_dir: Path | None = None,
                     stall_limit_s: float = DEFAULT_STALL_LIMIT_S,
                     before_release: ReleaseHook | None = None
                     ) -> SyncReplication | None:
    """Take over the synchronous mirror a previous host service left running (it
    restarted; the VM did not), without copying the disk again; None when there is no
    such mirror in sync (then the caller copies in full).

    A write-blocking mirror that is ``ready`` and still running has had every guest
    write on the replica (a failed target write ends the job). With the guest paused no
    write is in flight: the old mirror is cancelled (its socket and supervisor are gone
    with the old service), a ``sync=none`` write-blocking mirror on a connection of our
    own starts, the guest resumes. The replica misses nothing in between."""
    stall_limit_s = check_stall_limit(stall_limit_s)
    parse_nbd_uri(target_uri)
    mirror = (await _jobs(process)).get(f"rpl-m-{disk_node}")
    if mirror is None or not mirror.get("ready") or mirror.get("status") != "ready":
        return None
    fmt = await _node_format(process, disk_node)
    rep = SyncReplication(process, disk_node, export, tls_dir, stall_limit_s,
                          persistent=(fmt == "qcow2"), before_release=before_release)
    await rep._ensure_bitmaps()
    running = (await process.query_status()).running
    if running:
        await process.pause()
    try:
        await stop_sync_leftovers(process, disk_node)
        await rep._connect(target_uri, 1)
        await rep._start_mirror("none")
    except BaseException:
        rep.state = "broken"
        await rep.stop()
        raise
    finally:
        if running:
            await process.resume()
    rep._now_in_sync(time.monotonic())
    rep._supervise()
    return rep


async def stop_sync_leftovers(process: QemuProcess, disk_node: str) -> None:
    """Jobs and NBD nodes of an earlier ``SyncReplication`` of ``disk_node`` that nobody
    supervises any more (the host service restarted): cancelled and removed, so a new
    ``start_sync`` can begin. Its bitmaps stay (they are re-used)."""
    jobs = await _jobs(process)
    for job in (f"rpl-b-{disk_node}", f"rpl-m-{disk_node}"):
        if job in jobs:
            if jobs[job].get("status") == "concluded":
                await _execute(process, "job-dismiss", {"id": job})
            else:
                await _cancel_job(process, job)
    await _del_node(process, f"rpl-n-{disk_node}")


# --- asynchronous mode ------------------------------------------------------------------
async def run_async_cycle(process: QemuProcess, disk_node: str, target_uri: str, *,
                          spool_dir: Path, export: str = "disk",
                          tls_dir: Path | None = None,
                          stall_limit_s: float = DEFAULT_STALL_LIMIT_S,
                          speed: int | None = None, timeout: float = 3600.0
                          ) -> CycleReport:
    """Ship the blocks changed since the last confirmed cycle (all, the first time) as
    they were at the start of this call; ``speed`` caps the shipping in bytes/s.

    Two stages, so guest writes never wait for the network: the changed blocks are
    first copied (point in time) into a local spool image in ``spool_dir``, then only
    the spool's allocated blocks are shipped. A direct ``blockdev-backup`` into the NBD
    node would put its copy-before-write filter between the guest and the replica: a
    guest write to a not yet shipped block would wait for (and, QEMU 7.2's filter being
    ``break-guest-write``, fail with) a stuck replica. On failure the changes are kept
    for the next cycle (``abandon_async_cycle`` is done here); ReplicationFailed."""
    check_stall_limit(stall_limit_s)
    host, port = parse_nbd_uri(target_uri)
    fmt, size = await _node_info(process, disk_node)
    generations = await _settle_generations(process, disk_node)
    current = generations[-1] if generations else None
    spool = Path(spool_dir) / f"{disk_node}.spool.qcow2"
    spool_node, nbd = f"rpl-s-{disk_node}", f"rpl-a-{disk_node}"
    local_job, ship_job = f"rpl-s-{disk_node}", f"rpl-a-{disk_node}"
    started = time.monotonic()
    link: Link | None = None
    try:
        spool.unlink(missing_ok=True)
        create_image(spool, "qcow2", size)
        await _execute(process, "blockdev-add", {
            "driver": "qcow2", "node-name": spool_node,
            "file": {"driver": "file", "filename": str(spool)}})
        point = await _spool_changes(process, disk_node, spool_node, local_job, current,
                                     fmt, timeout)
        link = await Link.open(host, port, stall_limit_s)
        await _add_nbd_node(process, nbd, link, export, host, tls_dir)
        ended = _job_end(process, ship_job)
        ship: dict[str, Any] = {"job-id": ship_job, "device": spool_node, "target": nbd,
                                "sync": "top", "on-target-error": "report"}
        if speed:
            ship["speed"] = speed
        await _execute(process, "blockdev-backup", ship)
        event = _job_result(await _follow_job(ended, link, stall_limit_s, timeout))
        return CycleReport(int(event.get("offset", 0)), point, time.monotonic() - started,
                           full=current is None)
    except BaseException:
        if link is not None:
            link.shut()
        if not process.exited:
            jobs = await _jobs(process)
            for job in (ship_job, local_job):
                if job in jobs:
                    await _cancel_job(process, job)
            await abandon_async_cycle(process, disk_node)
        raise
    finally:
        if not process.exited:
            await _del_node(process, nbd)
            await _del_node(process, spool_node)
        if link is not None:
            link.close()
        spool.unlink(missing_ok=True)


async def _spool_changes(process: QemuProcess, node: str, spool_node: str, job: str,
                         current: int | None, fmt: str, timeout: float) -> ConsistentPoint:
    """Atomically: start the next bitmap generation, freeze the current one, and copy
    its blocks as of now into the spool (everything on the first cycle)."""
    new = f"{ASYNC_PREFIX}{(current or 0) + 1}"
    actions: list[dict[str, Any]] = [{"type": "block-dirty-bitmap-add", "data": {
        "node": node, "name": new, "persistent": fmt == "qcow2"}}]
    backup: dict[str, Any] = {"job-id": job, "device": node, "target": spool_node,
                              "sync": "full"}
    if current is not None:
        old = f"{ASYNC_PREFIX}{current}"
        actions.append({"type": "block-dirty-bitmap-disable",
                        "data": {"node": node, "name": old}})
        backup.update({"sync": "bitmap", "bitmap": old, "bitmap-mode": "never"})
    actions.append({"type": "blockdev-backup", "data": backup})
    ended = _job_end(process, job)
    try:
        await _execute(process, "transaction", {"actions": actions})
        point = ConsistentPoint(time.monotonic(), time.time())
        _job_result(await asyncio.wait_for(ended, timeout))
    except asyncio.TimeoutError as exc:
        raise ReplicationFailed(f"copying the changes locally took over {timeout:g} s") from exc
    finally:
        ended.cancel()
    return point


def _job_result(event: dict[str, Any]) -> dict[str, Any]:
    if event["event"] != "BLOCK_JOB_COMPLETED" or event.get("error"):
        raise ReplicationFailed(f"replication cycle failed: "
                                f"{event.get('error') or event['event']}")
    return event


async def _follow_job(ended: "asyncio.Future[dict[str, Any]]", link: Link,
                      stall_limit_s: float, timeout: float) -> dict[str, Any]:
    """Wait for a job's end event; ReplicationFailed when the replica stops answering
    (the link is cut first, so the job's pending writes fail at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ended.done():
        stalled = link.stalled_for(time.monotonic())
        if stalled >= stall_limit_s:
            link.shut()
            raise ReplicationFailed(f"the replica did not answer for {stalled:.1f} s"
                                    f" (limit {stall_limit_s:g} s)")
        if loop.time() >= deadline:
            raise ReplicationFailed(f"replication job not done after {timeout:g} s")
        await asyncio.wait({ended}, timeout=POLL_S)
    return ended.result()


async def _settle_generations(process: QemuProcess, node: str) -> list[int]:
    """Leftovers of an unconfirmed cycle (service restarted): merge into the newest."""
    names = [b["name"] for b in await _bitmaps(process, node)]
    generations = async_generations(names)
    while len(generations) > 1:
        await _merge_into_newest(process, node, generations[0], generations[-1])
        generations.pop(0)
    return generations


async def _merge_into_newest(process: QemuProcess, node: str, old: int, new: int) -> None:
    await _execute(process, "transaction", {"actions": [
        {"type": "block-dirty-bitmap-merge", "data": {
            "node": node, "target": f"{ASYNC_PREFIX}{new}",
            "bitmaps": [f"{ASYNC_PREFIX}{old}"]}},
        {"type": "block-dirty-bitmap-remove", "data": {
            "node": node, "name": f"{ASYNC_PREFIX}{old}"}}]})


async def confirm_async_cycle(process: QemuProcess, disk_node: str) -> None:
    """The replica committed the cycle: forget the blocks it shipped."""
    generations = async_generations([b["name"] for b in await _bitmaps(process, disk_node)])
    for old in generations[:-1]:
        await _execute(process, "block-dirty-bitmap-remove",
                       {"node": disk_node, "name": f"{ASYNC_PREFIX}{old}"})


async def abandon_async_cycle(process: QemuProcess, disk_node: str) -> None:
    """The cycle did not make it to the replica: its blocks go into the next one."""
    await _settle_generations(process, disk_node)


async def stop_async(process: QemuProcess, disk_node: str) -> None:
    """End asynchronous replication: drop its bitmaps (the next start ships all)."""
    for gen in async_generations([b["name"] for b in await _bitmaps(process, disk_node)]):
        await _execute(process, "block-dirty-bitmap-remove",
                       {"node": disk_node, "name": f"{ASYNC_PREFIX}{gen}"})


__all__ = ["ConsistentPoint", "ReplicationProgress", "CycleReport", "SyncReplication",
           "StallWatch", "BitmapRotation", "start_sync", "adopt_sync",
           "stop_sync_leftovers",
           "run_async_cycle",
           "confirm_async_cycle", "abandon_async_cycle", "stop_async", "parse_nbd_uri",
           "DEFAULT_STALL_LIMIT_S"]
