"""Read-only views the web console needs and no other route gives:

* ``GET /v1/vms/{name}/stats`` - one VM's counters right now (CPU seconds of its QEMU,
  memory, per-disk and per-NIC byte/operation counters); the same sources as
  ``/metrics`` (``parvisor.metrics``), for one VM and as JSON. Counters only: a client
  samples twice and divides by the time between (``at``) to get rates.
* ``GET /v1/disks`` - the image files under the storage roots, from ``stat`` only (no
  ``qemu-img`` per file, so a large root lists quickly); ``GET /v1/disks/info`` has
  the details of one.

Nothing here changes anything.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from fastapi import FastAPI

from parvisor import metrics
from parvisor.vm.argv import tap_name

API_PREFIX = "/v1"
STATS_BUDGET_S = 1.0          # a QEMU that does not answer in time: no disk counters
MAX_LISTED_DISKS = 2000       # a listing is for a person; beyond this it says "truncated"
IMAGE_FORMATS = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw", ".iso": "iso",
                 ".vhdx": "vhdx", ".vhd": "vpc", ".vmdk": "vmdk"}
# what the host's tap transmits the guest receives (see parvisor.metrics)
TAP_COUNTERS = (("receive_bytes", "tx_bytes"), ("transmit_bytes", "rx_bytes"),
                ("receive_packets", "tx_packets"), ("transmit_packets", "rx_packets"))


def install_inventory_routes(app: FastAPI, service: Any) -> None:
    @app.get(f"{API_PREFIX}/vms/{{name}}/stats", tags=["vms"],
             summary="One VM's counters now (CPU, memory, disks, NICs) for charts")
    async def vm_stats(name: str) -> dict[str, Any]:
        return await vm_counters(service, name)

    @app.get(f"{API_PREFIX}/disks", tags=["disks"],
             summary="Image files under the storage roots (stat only; info has details)")
    async def list_disks() -> dict[str, Any]:
        return await asyncio.to_thread(disk_listing, service)


async def vm_counters(service: Any, name: str) -> dict[str, Any]:
    record = service.store.get_vm(name)               # NotFound for an unknown VM
    runtime = service.vms.runtimes.get(record.uuid)
    process = runtime.process if runtime else None
    answer: dict[str, Any] = {"vm": name, "state": record.state.value, "at": time.time(),
                              "running": process is not None,
                              "memory_bytes": record.definition.memory_bytes,
                              "memory_actual_bytes": None, "qemu_rss_bytes": None,
                              "cpu_seconds": None, "disks": [], "nics": []}
    if process is None:
        return answer
    answer["memory_actual_bytes"] = runtime.memory_current_bytes or \
        record.definition.memory_bytes
    answer["cpu_seconds"] = metrics.process_cpu_seconds(process.pid)
    answer["qemu_rss_bytes"] = process_rss_bytes(process.pid)
    answer["disks"] = await _disk_counters(process)
    answer["nics"] = [nic_counters(nic.id, tap_name(record.uuid, nic.id))
                      for nic in record.definition.nics]
    return answer


async def _disk_counters(process: Any) -> list[dict[str, Any]]:
    try:
        found = await asyncio.wait_for(metrics._blockstats(process), STATS_BUDGET_S)
    except Exception:        # slow or gone QEMU: the chart skips one sample's disk figures
        return []
    return [{"device": s.device, "read_bytes": s.read_bytes, "written_bytes": s.written_bytes,
             "read_ops": s.read_ops, "write_ops": s.write_ops} for s in found]


def nic_counters(nic_id: str, tap: str, sys_net: Path = metrics.SYS_NET) -> dict[str, Any]:
    counters = {key: metrics.read_int(sys_net / tap / "statistics" / source)
                for key, source in TAP_COUNTERS}
    return {"id": nic_id, **counters}


def process_rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Resident memory of the QEMU process (what the VM costs the host now)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- disks ------------------------------------------------------------------------------
def disk_listing(service: Any) -> dict[str, Any]:
    roots = tuple(Path(r) for r in service.config.storage_roots)
    users = _users_by_path(service.store.list_vms())
    disks, truncated = [], False
    for path in image_files(roots):
        if len(disks) == MAX_LISTED_DISKS:
            truncated = True
            break
        disks.append(disk_entry(path, users))
    return {"roots": [str(r) for r in roots], "disks": disks, "truncated": truncated}


def image_files(roots: Iterable[Path]) -> Iterator[Path]:
    """Files with an image extension under the roots, sorted per directory; symlinks
    are not followed (a link out of a root must not list what it points to)."""
    for root in roots:
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                candidate = Path(directory) / name
                if candidate.suffix.lower() in IMAGE_FORMATS and not candidate.is_symlink():
                    yield candidate


def disk_entry(path: Path, users: dict[str, list[str]]) -> dict[str, Any]:
    try:
        stat = path.stat()
        size, allocated, modified = stat.st_size, stat.st_blocks * 512, stat.st_mtime
    except OSError:              # removed while listing
        size = allocated = modified = None
    return {"path": str(path), "format": IMAGE_FORMATS[path.suffix.lower()],
            "file_bytes": size, "allocated_bytes": allocated, "modified": modified,
            "used_by": users.get(str(path), [])}


def _users_by_path(records: Iterable[Any]) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for record in records:
        for disk in record.definition.disks:
            if disk.path:
                users.setdefault(str(disk.path), []).append(record.name)
    return {path: sorted(names) for path, names in users.items()}
