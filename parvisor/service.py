"""The host service process (``parvisor host serve``): Hyper-V's VMMS.

Wires config, store, accelerator and the VM manager; reconciles with the QEMUs that
outlived the previous service; serves the API on the unix socket (and TCP with TLS and
tokens when configured); rotates console logs. Stopping the service never stops VMs:
each QEMU lives in its own session and is re-adopted by the next service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import WebSocket

from parvisor.api.app import create_app
from parvisor.api.ws_bridge import bridge
from parvisor.web import console_server_config
from parvisor.config import HostConfig, write_default_config
from parvisor.errors import InvalidInput, ParvisorError
from parvisor.hypervisor.probe import HostInfo, current_accelerator, probe_host
from parvisor.image.tiny import build_tiny_image, load_tiny_image
from parvisor.model.states import ACTIVE_STATES, check_action
from parvisor.ops.dynamic_memory_loop import dynamic_memory_loop
from parvisor.ops.imports import clean_stale_staging
from parvisor.ops.jobs import Job, JobRegistry
from parvisor.ops.reconcile import apply_stop_actions, auto_start, reconcile
from parvisor.ops.vms import VmManager
from parvisor.ops.checkpoints import detect_interrupted
from parvisor.store.sqlite import SqliteStore
from parvisor.cluster.runtime import cluster_runtime
from parvisor.switch import NicUser, SwitchManager

log = logging.getLogger(__name__)
CONSOLE_LOG_MAX_BYTES = 2 << 20
ROTATE_EVERY_S = 10


def rotate_if_large(path: Path, max_bytes: int) -> bool:
    """Keep one previous generation (``console.log.1``); the writer keeps appending."""
    if path.stat().st_size <= max_bytes:
        return False
    shutil.copyfile(path, path.with_suffix(".log.1"))
    os.truncate(path, 0)
    return True


class HostService:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        for directory in (config.state_dir, config.state_dir / "run", *config.storage_roots):
            directory.mkdir(parents=True, exist_ok=True)
        os.chmod(config.state_dir, 0o711)
        write_default_config(config)
        # cluster member ([cluster] in config.toml): etcd store + agent; else SQLite
        self.cluster = cluster_runtime(config)
        self.store = self.cluster.store if self.cluster else SqliteStore(config.database)
        # in a cluster job ids name the host, so any member finds a job's host
        self.jobs = JobRegistry(f"job-{config.host_name}-" if self.cluster else "job-")
        self.cluster_api: Any = None    # parvisor.cluster.host_api.ClusterApi (cluster)
        self.forwarder: Any = None      # parvisor.api.forward.Forwarder (cluster)
        self.accelerator = current_accelerator()
        manager_class = self.cluster.vm_manager_class if self.cluster else VmManager
        self.vms = manager_class(config, self.store, self.jobs, self.accelerator)
        self.switches = SwitchManager(self.store, config.state_dir, nic_users=self._nic_users)
        self.vms.switches = self.switches

    def _nic_users(self, switch: str) -> list[NicUser]:
        return [NicUser(record.name, nic.id) for record in self.store.list_vms()
                for nic in record.definition.nics if nic.switch == switch]

    async def ensure_switches(self) -> None:
        """Re-create bridges, NAT and DHCP after a reboot; re-plug running VMs' taps."""
        running = [(record.uuid, nic) for record in self.store.list_vms()
                   if record.state in ACTIVE_STATES for nic in record.definition.nics]
        problems = await asyncio.to_thread(self.switches.ensure_all, running)
        for what, error in problems.items():
            self.vms.event("error", f"switch set-up of {what} failed: {error}")

    # --- facts ------------------------------------------------------------------------
    def host_info(self) -> HostInfo:
        info = probe_host(self.config.host_name)
        return info

    def tiny_image_info(self) -> dict[str, Any]:
        image = load_tiny_image(self.config.state_dir)
        return {"built": image is not None,
                **({k: str(v) for k, v in asdict(image).items()} if image else {})}

    def build_tiny_image(self, force: bool) -> Job:
        async def work(job: Job) -> dict[str, Any]:
            loop = asyncio.get_running_loop()

            def progress(fraction: float, message: str) -> None:
                loop.call_soon_threadsafe(job.report, fraction, message)
            image = await asyncio.to_thread(build_tiny_image, self.config.state_dir,
                                            force=force, progress=progress)
            return {k: str(v) for k, v in asdict(image).items()}
        return self.jobs.start("image-build", work)

    async def apply_stop_actions(self) -> dict[str, str]:
        return await apply_stop_actions(self.vms)

    # --- console ----------------------------------------------------------------------
    def console_log(self, name: str, tail_bytes: int) -> str:
        record = self.store.get_vm(name)
        path = self.vms.paths(record.uuid).console_log
        if not path.exists():
            return ""
        with open(path, "rb") as log_file:
            size = log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, size - tail_bytes))
            return log_file.read().decode(errors="replace")

    async def attach_console(self, websocket: WebSocket, name: str) -> None:
        """Bridge a WebSocket to the VM's serial socket (one interactive client)."""
        try:
            record = self.store.get_vm(name)
            check_action("console", record.state, vm=name)
            reader, writer = await asyncio.open_unix_connection(
                self.vms.paths(record.uuid).serial_socket)
        except (ParvisorError, OSError) as exc:
            await websocket.close(code=4404, reason=str(exc)[:120])
            return
        await websocket.accept()
        try:
            await bridge(websocket, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await websocket.close()

    async def rotate_console_logs(self) -> None:
        """QEMU appends with O_APPEND, so copy-then-truncate loses nothing it wrote."""
        while True:
            await asyncio.sleep(ROTATE_EVERY_S)
            for record in self.store.list_vms():
                with contextlib.suppress(OSError):
                    rotate_if_large(self.vms.paths(record.uuid).console_log,
                                    CONSOLE_LOG_MAX_BYTES)

    # --- run --------------------------------------------------------------------------
    async def run(self) -> None:
        if self.cluster is not None:    # only this host's QEMUs: the cluster places VMs
            await self.cluster.adopt(self.vms)
            await self._prepare_cluster_api()
        else:
            await reconcile(self.vms)
        # checkpoint create/apply/delete a dead service left half-done: reported
        await asyncio.to_thread(detect_interrupted, self.vms)
        # what an import killed mid-conversion left (its VM was never registered)
        await asyncio.to_thread(clean_stale_staging, tuple(self.config.storage_roots))
        await self.ensure_switches()
        background = [asyncio.create_task(self.rotate_console_logs()),
                      asyncio.create_task(dynamic_memory_loop(self.vms))]
        background += (await self.cluster.start(self.vms) if self.cluster is not None
                       else await auto_start(self.vms))
        servers = self._servers()
        _stop_on_signals(servers)
        try:
            await asyncio.gather(*(server.serve(sockets=sockets)
                                   for server, sockets in servers))
        finally:
            for task in background:
                task.cancel()
            # let them clean up (a cluster member kills its HA VMs, revokes its lease,
            # stops its watchdog) before asyncio.run cancels them again, mid-cleanup
            await asyncio.wait(background, timeout=15)
            self.detach_all()
            if self.forwarder is not None:
                await self.forwarder.close()
            self.switches.close()
            self.store.close()

    async def _prepare_cluster_api(self) -> None:
        """The cluster token and this host's cluster API certificate; its URL goes into
        the registration the agent publishes (so before ``cluster.start``)."""
        from parvisor.api.forward import Forwarder
        from parvisor.cluster.host_api import prepare_cluster_api
        cluster = self.cluster
        api = await cluster._wait_for_etcd(lambda: prepare_cluster_api(
            cluster.settings, cluster.dir, self.store.kv, self.store.keys.prefix))
        cluster.api_url = api.url
        self.cluster_api = api
        self.forwarder = Forwarder(self.config.host_name, self.store, api.token,
                                   api.client_ssl())

    def _servers(self) -> list[tuple[uvicorn.Server, list[socket.socket] | None]]:
        servers = [(uvicorn.Server(uvicorn.Config(create_app(self), log_level="warning",
                                                  lifespan="off")),
                    [self._unix_socket()])]
        api = self.cluster_api
        if api is not None and api.url:     # other members forward requests here
            host, port = api.listen
            cluster = uvicorn.Config(
                create_app(self, tokens=(api.token, *self.config.api_tokens)),
                host=host, port=port, log_level="warning", lifespan="off",
                ssl_certfile=str(api.tls.cert), ssl_keyfile=str(api.tls.key))
            servers.append((uvicorn.Server(cluster), None))
        for listen in self.config.listen_tcp:
            host, _, port = listen.rpartition(":")
            if not port.isdigit():
                raise InvalidInput(f"listen_tcp entry {listen!r} is not HOST:PORT")
            tcp = uvicorn.Config(create_app(self, tokens=self.config.api_tokens),
                                 host=host.strip("[]"), port=int(port), log_level="warning",
                                 ssl_certfile=str(self.config.tls_cert),
                                 ssl_keyfile=str(self.config.tls_key), lifespan="off")
            servers.append((uvicorn.Server(tcp), None))
        if self.config.console_listen:   # the web console: its own login (parvisor.web)
            servers.append((uvicorn.Server(console_server_config(self)), None))
        return servers

    def _unix_socket(self) -> socket.socket:
        """Bound by us so it is 0600 (root only) before anyone can connect."""
        path = self.config.api_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return sock

    def detach_all(self) -> None:
        """Leave every QEMU running; the next service re-adopts them."""
        for runtime in self.vms.runtimes.values():
            runtime.cancel_watchers()
            if runtime.process is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_event_loop().create_task(runtime.process.detach())


def _stop_on_signals(servers: list[tuple[uvicorn.Server, Any]]) -> None:
    """SIGTERM/SIGINT end every server and ``run`` cleans up (a cluster member kills its
    HA VMs, revokes its lease, stops its watchdog). uvicorn's own handling (>= 0.29)
    re-raises the signal once its server stopped: the default action then killed the
    process before any of that cleanup (found by tests/integration/test_cluster_admin.py)."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server, _ in servers:
            server.should_exit = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    for server, _ in servers:
        server.capture_signals = contextlib.nullcontext     # type: ignore[method-assign]


def serve_forever(state_dir: str | None) -> None:
    """Entry point of ``parvisor host serve``."""
    from parvisor.config import load_config, state_dir_from_env
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(state_dir_from_env(state_dir))
    service = HostService(config)
    info = service.host_info()
    log.info("parvisor host service: state %s, API %s, accelerator %s (%s)",
             config.state_dir, config.api_socket, info.accelerator, info.accelerator_reason)
    if info.accelerator_warning:
        log.warning("%s", info.accelerator_warning)
    asyncio.run(service.run())
