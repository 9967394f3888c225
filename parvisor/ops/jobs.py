"""Jobs: long operations (image build, save, restore, later import and migration).

A job has an id, a progress fraction and a message; clients poll ``GET /jobs/{id}``
and draw a progress bar. Jobs live in memory: they describe work of this service
process; what the work *changes* is in the store.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
import traceback
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from parvisor.errors import NotFound, ParvisorError

log = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class Job:
    id: str
    kind: str
    vm_name: str | None
    status: JobStatus = JobStatus.RUNNING
    progress: float = 0.0
    message: str = ""
    error: dict[str, Any] | None = None
    result: Any = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def report(self, fraction: float, message: str = "") -> None:
        self.progress = max(self.progress, min(1.0, fraction))
        if message:
            self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "vm": self.vm_name,
                "status": self.status.value, "progress": round(self.progress, 4),
                "message": self.message, "error": self.error, "result": self.result,
                "started_at": self.started_at, "finished_at": self.finished_at}

    async def wait(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._done.wait(), timeout)


class JobRegistry:
    KEEP_FINISHED = 500

    def __init__(self, prefix: str = "job-") -> None:
        # a cluster member's prefix names the host ("job-h1-"): ids are unique in the
        # cluster and any member can forward GET /v1/jobs/ID to the job's host
        self._prefix = prefix
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()

    def start(self, kind: str, work: Callable[[Job], Awaitable[Any]],
              vm_name: str | None = None) -> Job:
        job = Job(id=f"{self._prefix}{next(self._ids)}", kind=kind, vm_name=vm_name)
        self._jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._trim()
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[Any]]) -> None:
        try:
            job.result = await work(job)
            job.status, job.progress = JobStatus.SUCCEEDED, 1.0
        except ParvisorError as exc:
            job.status, job.error = JobStatus.FAILED, exc.to_dict()
            job.message = exc.message
        except Exception as exc:  # a bug: keep the service alive, report it
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            job.status = JobStatus.FAILED
            job.error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                         "details": {}}
            job.message = job.error["message"]
        finally:
            job.finished_at = time.time()
            job._done.set()

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id}", job=job_id) from None

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.status != JobStatus.RUNNING]
        for job in finished[:-self.KEEP_FINISHED]:
            del self._jobs[job.id]
