"""Imports as jobs: ``import vmc|disk|ovf`` convert disks, then register the VM.

What for: the wiring of issue 7. ``ImportManager.start_*`` prepares synchronously
(``parvisor.ops.import_plans``: every refusal happens there, before a job exists) and
then starts a job ``import`` that

1. makes a private staging folder ``<first storage root>/.parvisor-import/<host>-<pid>-<token>``;
2. runs the plan's ``stage`` step (an OVA is extracted there), converts every disk into
   the staging folder (``parvisor.importers.convert``, progress from ``qemu-img -p``);
3. links each converted disk to its final name ``vms/<vm>/<disk id>.qcow2`` (``link``
   never overwrites), then writes the VM record; if anything fails the linked files
   are removed again, and the staging folder is removed in every case.

A SIGKILL of the service during conversion leaves only the staging folder (qemu-img dies
with the service: PR_SET_PDEATHSIG). ``clean_stale_staging`` removes such folders; it
runs when the import routes are installed (service start) and before every import.

What never: no import writes outside the staging folder and the VM's own disk folder;
no source file is changed; no VM record exists before all its disks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

from parvisor.errors import AlreadyExists, StorageError
from parvisor.importers.convert import convert_to_qcow2
from parvisor.ops.import_plans import (
    HostView, PreparedImport, prepare_disk, prepare_ovf, prepare_vmc)
from parvisor.ops.import_requests import ImportDisk, ImportOvf, ImportVmc
from parvisor.ops.jobs import Job
from parvisor.testing.crashpoints import crashpoint

log = logging.getLogger(__name__)
STAGING_DIR = ".parvisor-import"
Report = Callable[[float, str], None]


# --- staging folders -----------------------------------------------------------------------
def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


_ACTIVE: set[Path] = set()          # staging folders of imports running in this process


def new_staging(root: Path) -> Path:
    folder = root / STAGING_DIR / f"{_owner_tag()}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True, mode=0o700)
    _ACTIVE.add(folder)
    return folder


def drop_staging(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    _ACTIVE.discard(folder)


def _stale(entry: Path) -> bool:
    host, _, rest = entry.name.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False                  # another host's import on shared storage: not ours
    pid = int(rest)
    if pid == os.getpid():
        return entry not in _ACTIVE
    return not Path(f"/proc/{pid}").exists()


def clean_stale_staging(roots: tuple[Path, ...]) -> list[Path]:
    """Remove staging folders of imports that died (SIGKILL, power loss)."""
    removed = []
    for root in roots:
        base = root / STAGING_DIR
        for entry in sorted(base.iterdir()) if base.is_dir() else []:
            if entry.is_dir() and not entry.is_symlink() and _stale(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        log.info("removed %d stale import staging folder(s): %s", len(removed),
                 ", ".join(map(str, removed)))
    return removed


# --- the manager ------------------------------------------------------------------------------
class ImportManager:
    """Prepares imports (refusals: nothing started) and runs them as ``import`` jobs."""

    def __init__(self, config: Any, store: Any, vms: Any, jobs: Any) -> None:
        self.config, self.store, self.vms, self.jobs = config, store, vms, jobs

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(self.config.storage_roots)

    def host_view(self) -> HostView:
        return HostView(self.roots, self.store, self.vms.switches)

    async def start_vmc(self, request: ImportVmc) -> Job:
        return await self._start(prepare_vmc, request)

    async def start_disk(self, request: ImportDisk) -> Job:
        return await self._start(prepare_disk, request)

    async def start_ovf(self, request: ImportOvf) -> Job:
        return await self._start(prepare_ovf, request)

    async def _start(self, prepare: Callable[[HostView, Any], PreparedImport],
                     request: Any) -> Job:
        await asyncio.to_thread(clean_stale_staging, self.roots)
        prepared = await asyncio.to_thread(prepare, self.host_view(), request)
        name = prepared.definition.name

        async def work(job: Job) -> dict[str, Any]:
            loop = asyncio.get_running_loop()

            def report(fraction: float, message: str) -> None:
                loop.call_soon_threadsafe(job.report, fraction, message)
            return await self.run(prepared, report)
        return self.jobs.start("import", work, name)

    async def run(self, prepared: PreparedImport, report: Report) -> dict[str, Any]:
        """Convert into staging, then register; staging is gone afterwards either way."""
        staging = new_staging(self.roots[0])
        try:
            sizes = await asyncio.to_thread(self._convert_all, prepared, staging, report)
            report(0.98, "registering the VM")
            return self._register(prepared, staging, sizes)
        finally:
            await asyncio.to_thread(drop_staging, staging)

    # --- converting (worker thread) ---------------------------------------------------------
    def _convert_all(self, prepared: PreparedImport, staging: Path,
                     report: Report) -> dict[str, int]:
        if prepared.stage is not None:
            report(0.0, f"unpacking {prepared.source.name}")
            prepared.stage(staging)
        sources = {work.id: work.locate(staging) for work in prepared.disks}
        total = sum(s.virtual_size for s in sources.values()) or 1
        done, sizes = 0, {}
        for work in prepared.disks:
            source = sources[work.id]
            start, share = done / total * 0.95, source.virtual_size / total * 0.95

            def progress(fraction: float, label: str = work.label) -> None:
                if fraction > 0:                      # qemu-img runs, its output exists
                    crashpoint("import.converting")   # crash tests: mid-conversion
                report(0.02 + start + share * fraction, f"converting {label}")
            progress(0.0)
            sizes[work.id] = convert_to_qcow2(source, staging / f"{work.id}.qcow2",
                                              staging, progress)
            done += source.virtual_size
        return sizes

    # --- registering (event loop: store writes) ----------------------------------------------
    def _register(self, prepared: PreparedImport, staging: Path,
                  sizes: dict[str, int]) -> dict[str, Any]:
        placed: list[Path] = []
        try:
            for work in prepared.disks:
                work.target.parent.mkdir(parents=True, exist_ok=True)
                _link_new(staging / f"{work.id}.qcow2", work.target)
                placed.append(work.target)
                _give_to(work.target, self.vms._qemu_user())
            crashpoint("import.before_commit")
            record = self.store.create_vm(prepared.definition)
        except BaseException:
            for path in placed:
                path.unlink(missing_ok=True)
            for folder in {p.parent for p in placed}:
                with contextlib.suppress(OSError):
                    folder.rmdir()                        # only when empty
            raise
        self.vms.event("created", f"{record.name}: imported from {prepared.source}",
                       record, source=str(prepared.source), format=prepared.kind)
        return {"vm": self.vms.status(record).model_dump(mode="json"),
                "source": str(prepared.source), "kind": prepared.kind,
                "disks": [{"id": w.id, "path": str(w.target), "virtual_size": sizes[w.id]}
                          for w in prepared.disks],
                "attention": prepared.attention}


def _link_new(staged: Path, target: Path) -> None:
    try:
        os.link(staged, target)                 # refuses to overwrite: no clobbering
    except FileExistsError:
        raise AlreadyExists(f"{target} appeared during the import; left it untouched",
                            path=str(target)) from None
    except OSError as exc:
        raise StorageError(f"cannot place {target}: {exc}", path=str(target)) from exc


def _give_to(path: Path, run_as: str | None) -> None:
    # QEMU runs as run_as and needs write access to its own disks (as in ops.disks).
    if run_as:
        user = pwd.getpwnam(run_as)
        for item in (path.parent, path):
            os.chown(item, user.pw_uid, user.pw_gid)
