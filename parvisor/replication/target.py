"""``ReplicaTarget``: one object owns one ``qemu-storage-daemon`` on the replica host.

The daemon opens the replica's local image (format always explicit), serves it over NBD
on TCP (optionally TLS with the host's x509 directory from
``parvisor.migration.tls.write_tls_dir``, peers verified against the cluster CA) and is
controlled over its QMP socket. It runs in its own session with output in ``qsd.log``
and is stopped by PID (``quit``, then SIGTERM, then SIGKILL).

Two ways of writing, one per replication mode:

* synchronous: ``export_live()`` exports the image itself, ``writethrough`` (every write
  the primary sees acknowledged is flushed on the replica host, so a crash of the
  replica host cannot lose it);
* asynchronous: ``begin_cycle()`` puts a fresh qcow2 overlay on top of the image and
  exports only the overlay; ``commit_cycle()`` commits it into the image (then flushes it) once the
  primary says the cycle is complete, ``abort_cycle()`` throws it away. The image itself
  is therefore always the last *complete* cycle (the last consistent point).

Order: ``create_replica_image`` (once) -> ``await ReplicaTarget.start(...)`` ->
``export_live()`` or per cycle ``begin_cycle()`` / ``commit_cycle()`` | ``abort_cycle()``
-> ``await stop()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parvisor.errors import InvalidInput, QmpError, ReplicationFailed, VmError
from parvisor.procfs import pid_alive
from parvisor.qmp.client import QmpConnection
from parvisor.storage.qemu_img import create_image, inspect_image

log = logging.getLogger(__name__)

IMAGE_NODE = "replica"          # the replica image's format node
FILE_NODE = "replica-file"
OVERLAY_NODE = "cycle"          # an async cycle's overlay (format node)
OVERLAY_FILE_NODE = "cycle-file"
TLS_ID = "replica-tls"
EXPORT_ID = "replica-export"
START_TIMEOUT_S = 20.0
COMMIT_TIMEOUT_S = 600.0
FORMATS = ("qcow2", "raw")


def create_replica_image(path: Path, fmt: str, virtual_size: int) -> None:
    """An empty replica image of the primary disk's virtual size (qemu-img, capped)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"replica image format must be one of {FORMATS}, not {fmt!r}")
    if virtual_size <= 0:
        raise InvalidInput(f"replica image size must be positive, not {virtual_size}")
    if Path(path).exists():
        raise InvalidInput(f"replica image {path} already exists")
    create_image(Path(path), fmt, virtual_size)


@dataclass(frozen=True)
class TargetSpec:
    """What a replica target serves, and where."""

    image: Path
    format: str
    listen_host: str
    port: int
    state_dir: Path                 # QMP socket, pidfile, log, cycle overlays
    export_name: str = "disk"
    tls_dir: Path | None = None
    netns: str | None = None        # run inside this network namespace (tests, lab)
    # where the QMP socket goes when state_dir is too deep for a UNIX socket path
    # (108 bytes): e.g. the service's run dir; the file name is derived from state_dir
    socket_dir: Path | None = None

    @property
    def qmp_socket(self) -> Path:
        if self.socket_dir is None:
            return Path(self.state_dir) / "qsd.qmp"
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
        return Path(self.socket_dir) / f"qsd-{tag}.qmp"

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise InvalidInput(f"replica format must be one of {FORMATS}")
        if not Path(self.image).is_file():
            raise InvalidInput(f"replica image {self.image} does not exist")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"bad port {self.port}")
        if self.tls_dir is not None and not (Path(self.tls_dir) / "server-cert.pem").is_file():
            raise InvalidInput(f"{self.tls_dir} holds no server-cert.pem")


def daemon_argv(spec: TargetSpec, qmp_socket: Path, pidfile: Path) -> list[str]:
    """qemu-storage-daemon's command line (pure): image nodes, the NBD server, QMP."""
    argv = ["ip", "netns", "exec", spec.netns] if spec.netns else []
    argv += ["qemu-storage-daemon",
            "--blockdev", _opts({"driver": "file", "node-name": FILE_NODE,
                                 "filename": str(spec.image)}),
            "--blockdev", _opts({"driver": spec.format, "node-name": IMAGE_NODE,
                                 "file": FILE_NODE})]
    server: dict[str, str] = {"addr.type": "inet", "addr.host": spec.listen_host,
                              "addr.port": str(spec.port)}
    if spec.tls_dir is not None:
        argv += ["--object", _opts({"qom-type": "tls-creds-x509", "id": TLS_ID,
                                    "dir": str(spec.tls_dir), "endpoint": "server",
                                    "verify-peer": "on"})]
        server["tls-creds"] = TLS_ID
    argv += ["--nbd-server", _opts(server),
             "--chardev", f"socket,id=qmp,path={qmp_socket},server=on,wait=off",
             "--monitor", "chardev=qmp", "--pidfile", str(pidfile)]
    return argv


def flush_argv(spec: TargetSpec) -> list[str]:
    """qemu-io connecting to the target's own export (TLS with the same directory's
    client certificate) and sending one flush (pure)."""
    argv = ["ip", "netns", "exec", spec.netns] if spec.netns else []
    argv.append("qemu-io")
    opts = {"driver": "raw", "file.driver": "nbd", "file.server.type": "inet",
            "file.server.host": spec.listen_host, "file.server.port": str(spec.port),
            "file.export": spec.export_name}
    if spec.tls_dir is not None:
        argv += ["--object", _opts({"qom-type": "tls-creds-x509", "id": "flush-tls",
                                    "dir": str(spec.tls_dir), "endpoint": "client"})]
        opts["file.tls-creds"] = "flush-tls"
        opts["file.tls-hostname"] = spec.listen_host
    return argv + ["--image-opts", _opts(opts), "-c", "flush"]


def _opts(options: dict[str, str]) -> str:
    """``key=value,...`` with QEMU's comma escaping of values (paths may hold commas)."""
    items = dict(options)
    head = []
    if "qom-type" in items:         # --object takes the type as the first, bare item
        head.append(items.pop("qom-type"))
    return ",".join(head + [f"{k}={str(v).replace(',', ',,')}" for k, v in items.items()])


class ReplicaTarget:
    """One running qemu-storage-daemon. Create with ``start``."""

    def __init__(self, spec: TargetSpec, child: subprocess.Popen[bytes] | None,
                 qmp: QmpConnection, pid: int | None = None) -> None:
        self.spec = spec
        self.pid = child.pid if child is not None else int(pid or 0)
        self._child = child              # None: adopted from an earlier host service
        self.qmp = qmp
        self._overlay: Path | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.spec.qmp_socket

    @property
    def nbd_uri(self) -> str:
        host = self.spec.listen_host
        return f"nbd://{f'[{host}]' if ':' in host else host}:{self.spec.port}"

    @property
    def exited(self) -> bool:
        if self._child is not None:
            return self._child.poll() is not None
        return not pid_alive(self.pid)

    @classmethod
    async def start(cls, spec: TargetSpec, *, timeout: float = START_TIMEOUT_S
                    ) -> "ReplicaTarget":
        spec.validate()
        state = Path(spec.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        qmp_socket, pidfile = spec.qmp_socket, state / "qsd.pid"
        qmp_socket.parent.mkdir(parents=True, exist_ok=True)
        qmp_socket.unlink(missing_ok=True)
        argv = daemon_argv(spec, qmp_socket, pidfile)
        with (state / "qsd.log").open("ab") as out:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        qmp = QmpConnection(qmp_socket, name=f"qsd-{child.pid}")
        target = cls(spec, child, qmp)
        try:
            await target._connect(timeout)
        except BaseException:
            await target.stop()
            raise
        log.info("replica target pid %d serves %s on %s", child.pid, spec.image,
                 target.nbd_uri)
        target._record()
        return target

    # --- surviving a restart of the host service ---------------------------------------
    def _record(self) -> None:
        """What ``adopt`` needs to find this daemon again (``target.json``)."""
        spec = {k: (str(v) if isinstance(v, Path) else v)
                for k, v in self.spec.__dict__.items()}
        tmp = Path(self.spec.state_dir) / "target.json.tmp"
        tmp.write_text(json.dumps({"pid": self.pid, "spec": spec}))
        os.replace(tmp, Path(self.spec.state_dir) / "target.json")

    @classmethod
    async def adopt(cls, state_dir: Path, timeout: float = 5.0) -> "ReplicaTarget | None":
        """The daemon an earlier host service started for ``state_dir``, if it still
        runs (its PID, with our pidfile on its command line): connected again over QMP
        with its exports untouched, so the primary's connection never notices. None
        when there is none (or it does not answer)."""
        try:
            doc = json.loads((Path(state_dir) / "target.json").read_text())
            pid = int(doc["pid"])
            fields = doc["spec"]
        except (OSError, ValueError, KeyError):
            return None
        for key in ("image", "state_dir", "tls_dir", "socket_dir"):
            if fields.get(key) is not None:
                fields[key] = Path(fields[key])
        spec = TargetSpec(**fields)
        if not daemon_of(pid, Path(state_dir) / "qsd.pid"):
            return None
        target = cls(spec, None, QmpConnection(spec.qmp_socket, name=f"qsd-{pid}"), pid)
        try:
            await target.qmp.connect(timeout=timeout)
            nodes = {n.get("node-name") for n in await target.execute("query-named-block-nodes")}
        except (VmError, OSError):
            return None
        if OVERLAY_NODE in nodes:
            target._overlay = target.overlay_path
        log.info("replica target pid %d (from an earlier service) serves %s on %s", pid,
                 spec.image, target.nbd_uri)
        return target

    async def _connect(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.qmp_socket.exists():
            if self.exited or loop.time() >= deadline:
                raise ReplicationFailed("qemu-storage-daemon did not start: "
                                        + self.log_tail())
            await asyncio.sleep(0.02)
        await self.qmp.connect(timeout=max(1.0, deadline - loop.time()))

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return (Path(self.spec.state_dir) / "qsd.log").read_text(
                errors="replace")[-limit:].strip()
        except FileNotFoundError:
            return ""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    # --- synchronous mode ----------------------------------------------------------------
    async def export_live(self) -> str:
        """Export the image itself, writable, flushed after every write; the NBD URI."""
        await self._export(IMAGE_NODE)
        return self.nbd_uri

    async def _export(self, node: str) -> None:
        await self.execute("block-export-add", {
            "type": "nbd", "id": EXPORT_ID, "node-name": node,
            "name": self.spec.export_name, "writable": True, "writethrough": True})

    async def unexport(self) -> None:
        exports = await self.execute("query-block-exports")
        if any(e.get("id") == EXPORT_ID for e in exports):
            await self.execute("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
            await self._wait_export_gone()

    async def _wait_export_gone(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(e.get("id") == EXPORT_ID for e in await self.execute("query-block-exports")):
            if loop.time() >= deadline:
                raise ReplicationFailed("the replica export did not go away")
            await asyncio.sleep(0.02)

    # --- asynchronous mode: one overlay per cycle -----------------------------------------
    async def begin_cycle(self) -> str:
        """A fresh overlay over the image, exported instead of it; the NBD URI."""
        if self._overlay is not None:
            await self.abort_cycle()
        await self.unexport()
        overlay = self.overlay_path
        overlay.unlink(missing_ok=True)
        size = inspect_image(Path(self.spec.image), self.spec.format).virtual_size
        # no backing file in the header: the overlay is linked to the image's node at
        # run time only, so it can never be opened (or committed) on its own later
        create_image(overlay, "qcow2", size)
        self._overlay = overlay
        await self.execute("blockdev-add", {"driver": "file", "node-name": OVERLAY_FILE_NODE,
                                            "filename": str(overlay)})
        await self.execute("blockdev-add", {"driver": "qcow2", "node-name": OVERLAY_NODE,
                                            "file": OVERLAY_FILE_NODE, "backing": IMAGE_NODE})
        await self._export(OVERLAY_NODE)
        return self.nbd_uri

    async def commit_cycle(self, timeout: float = COMMIT_TIMEOUT_S) -> None:
        """The primary shipped a whole cycle: fold the overlay into the image."""
        if self._overlay is None:
            raise ReplicationFailed("no replication cycle is open on this replica")
        await self.unexport()        # nothing can write into the overlay any more
        job = "replica-commit"
        await self.execute("block-commit", {"job-id": job, "device": OVERLAY_NODE,
                                            "top-node": OVERLAY_NODE,
                                            "base-node": IMAGE_NODE, "auto-dismiss": True})
        await self._finish_active_commit(job, timeout)
        await self._flush_image()        # durable before the overlay file goes
        await self._drop_overlay()

    async def _flush_image(self, timeout: float = 120.0) -> None:
        """Flush the image (QEMU's qcow2 metadata cache, then the host's page cache).
        qemu-storage-daemon has no flush command and ``blockdev-reopen`` does not
        flush, so an NBD client sends NBD_CMD_FLUSH to a short-lived export."""
        await self._export(IMAGE_NODE)
        try:
            argv = flush_argv(self.spec)
            done = await asyncio.to_thread(subprocess.run, argv, capture_output=True,
                                           text=True, timeout=timeout)
            if done.returncode != 0:
                raise ReplicationFailed(f"flushing the replica image failed: "
                                        f"{(done.stderr or done.stdout).strip()[:500]}",
                                        argv=argv)
        except subprocess.TimeoutExpired as exc:
            raise ReplicationFailed("flushing the replica image timed out") from exc
        finally:
            await self.unexport()

    async def _finish_active_commit(self, job: str, timeout: float) -> None:
        """An active commit is a mirror: wait for ready, complete it, wait until gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        completed = False
        while True:
            jobs = {j["device"]: j for j in await self.execute("query-block-jobs")}
            current = jobs.get(job)
            if current is None:
                if not completed:
                    raise ReplicationFailed("committing the cycle into the replica failed:"
                                            " the job ended before it was ready")
                return
            if current.get("ready") and not completed:
                await self.execute("job-complete", {"id": job})
                completed = True
            if loop.time() >= deadline:
                raise ReplicationFailed(f"committing the cycle took over {timeout:g} s")
            await asyncio.sleep(0.02)

    @property
    def overlay_path(self) -> Path:
        """Where an async cycle's overlay lives (it survives a crash of this host)."""
        return Path(self.spec.state_dir) / "cycle.qcow2"

    async def replay_commit(self) -> None:
        """A commit cut short (the host lost power while folding a complete cycle in):
        fold the overlay left on disk in again. Every block of the overlay is written
        over the image, so a half-committed image becomes the whole cycle."""
        overlay = self.overlay_path
        if not overlay.exists():
            raise ReplicationFailed(f"no cycle overlay {overlay} to commit again")
        await self.execute("blockdev-add", {"driver": "file", "node-name": OVERLAY_FILE_NODE,
                                            "filename": str(overlay)})
        await self.execute("blockdev-add", {"driver": "qcow2", "node-name": OVERLAY_NODE,
                                            "file": OVERLAY_FILE_NODE, "backing": IMAGE_NODE})
        self._overlay = overlay
        await self.commit_cycle()

    async def abort_cycle(self) -> None:
        """Throw the open cycle away: the image stays at the previous consistent point."""
        if self._overlay is None:
            return
        await self.unexport()
        await self._drop_overlay()

    async def _drop_overlay(self) -> None:
        for node in (OVERLAY_NODE, OVERLAY_FILE_NODE):
            try:
                await self.execute("blockdev-del", {"node-name": node})
            except QmpError as exc:
                log.debug("blockdev-del %s: %s", node, exc.message)
        if self._overlay is not None:
            self._overlay.unlink(missing_ok=True)
        self._overlay = None

    # --- stop ----------------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        """``quit`` over QMP, then SIGTERM, then SIGKILL, by PID; waits for the exit."""
        if not self.exited:
            try:
                if self.qmp.connected:
                    await self.qmp.execute("quit")
            except VmError:
                pass
            if not await self._wait_exit(timeout / 2):
                self._signal(signal.SIGTERM)
                if not await self._wait_exit(timeout / 2):
                    self._signal(signal.SIGKILL)
                    await self._wait_exit(5.0)
        try:
            await self.qmp.disconnect()
        except Exception:
            pass

    def _signal(self, sig: signal.Signals) -> None:
        if not self.exited:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    async def _wait_exit(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.exited:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def freeze(self) -> None:
        """SIGSTOP the daemon (tests: an unresponsive peer whose kernel still ACKs)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)


def daemon_of(pid: int, pidfile: Path) -> bool:
    """Whether ``pid`` is a live qemu-storage-daemon started with ``pidfile`` (a reused
    PID of another process is never taken for it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return (pid_alive(pid) and b"qemu-storage-daemon" in cmdline
            and str(pidfile).encode() in cmdline)


__all__ = ["ReplicaTarget", "TargetSpec", "create_replica_image", "daemon_argv",
           "daemon_of"]
