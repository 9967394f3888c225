"""Checkpoints of a *running* VM through its QMP session (QEMU has the images locked).

* with memory: ``snapshot-save`` / ``snapshot-load`` jobs (QEMU 6.0+) snapshot every
  listed disk plus RAM and device state into one qcow2 node (``vmstate``);
* disks only: one ``transaction`` of ``blockdev-snapshot-internal-sync`` actions, so
  all disks are taken at the same instant (crash-consistent, like a power cut);
* delete: a ``snapshot-delete`` job (disks lacking the tag are skipped by QEMU).

This module speaks only these commands; which disks and tags to use is decided by
``parvisor.ops.checkpoints``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from parvisor.errors import VmError

JOB_TIMEOUT_S = 600
_POLL_S = (0.02, 0.25)             # first and longest interval between query-jobs
_job_ids = itertools.count(1)


async def run_job(qmp: Any, command: str, arguments: dict[str, Any],
                  timeout: float = JOB_TIMEOUT_S) -> None:
    """Start a QMP job and wait until it concludes; VmError with QEMU's reason if it
    failed. The concluded job is dismissed so its id can never clash later."""
    job_id = f"pv-{command}-{next(_job_ids)}"
    await qmp.execute(command, {"job-id": job_id, **arguments})
    loop = asyncio.get_running_loop()
    deadline, interval = loop.time() + timeout, _POLL_S[0]
    while True:
        job = next((j for j in await qmp.execute("query-jobs") if j["id"] == job_id), None)
        if job is None:
            raise VmError(f"QEMU lost track of job {job_id} ({command})", command=command)
        if job["status"] == "concluded":
            await qmp.execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise VmError(f"{command} failed: {job['error']}", command=command,
                              qemu_message=job["error"])
            return
        if loop.time() >= deadline:
            raise VmError(f"{command} did not finish within {timeout:g} s", command=command)
        await asyncio.sleep(interval)      # polling QEMU's job state, bounded by deadline
        interval = min(interval * 1.5, _POLL_S[1])


async def save_with_memory(qmp: Any, tag: str, vmstate_node: str, nodes: list[str]) -> None:
    await run_job(qmp, "snapshot-save", {"tag": tag, "vmstate": vmstate_node,
                                         "devices": nodes})


async def load_with_memory(qmp: Any, tag: str, vmstate_node: str, nodes: list[str]) -> None:
    await run_job(qmp, "snapshot-load", {"tag": tag, "vmstate": vmstate_node,
                                         "devices": nodes})


async def snapshot_disks(qmp: Any, tag: str, nodes: list[str]) -> None:
    actions = [{"type": "blockdev-snapshot-internal-sync",
                "data": {"device": node, "name": tag}} for node in nodes]
    await qmp.execute("transaction", {"actions": actions})


async def delete(qmp: Any, tag: str, nodes: list[str]) -> None:
    await run_job(qmp, "snapshot-delete", {"tag": tag, "devices": nodes})
