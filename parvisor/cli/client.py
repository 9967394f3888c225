"""The CLI's HTTP client: talks to the host service over its unix socket (or TCP).

Turns error responses back into ``ParvisorError`` subclasses so the CLI can print one
readable line; turns "cannot connect" into ``ServiceUnavailable`` with a hint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from parvisor import errors
from parvisor.config import load_config, state_dir_from_env

_ERRORS_BY_CODE = {cls.code: cls for cls in (
    errors.InvalidInput, errors.NotFound, errors.AlreadyExists, errors.Busy,
    errors.Unauthorized, errors.Forbidden, errors.VmError, errors.QmpError,
    errors.GuestAgentError, errors.StorageError, errors.StoreError, errors.ImageError,
    errors.Refused, errors.ServiceUnavailable, errors.Failed)}


class ApiClient:
    def __init__(self, state_dir: str | Path | None = None) -> None:
        url = os.environ.get("PARVISOR_URL")
        headers = {}
        if url:
            token = os.environ.get("PARVISOR_TOKEN", "")
            headers["Authorization"] = f"Bearer {token}"
            self.where = url
            self._http = httpx.Client(base_url=url, headers=headers, timeout=None,
                                      verify=os.environ.get("PARVISOR_CA", True))
        else:
            socket_path = load_config(state_dir_from_env(state_dir)).api_socket
            self.where = str(socket_path)
            self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)),
                                      base_url="http://parvisor", timeout=None)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, f"/v1{path}", **kwargs)
        except httpx.TransportError as exc:
            raise errors.ServiceUnavailable(
                f"cannot reach the parvisor host service at {self.where} ({exc}); "
                "start it with 'parvisor host serve' (or ./setup.sh demo)") from exc
        if response.status_code >= 400:
            raise _error_from(response)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def wait_job(self, job: dict[str, Any],
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until it ends; raise its error if it failed."""
        while job["status"] == "running":
            if on_progress:
                on_progress(job)
            time.sleep(0.2)
            job = self.get(f"/jobs/{job['id']}")
        if on_progress:
            on_progress(job)
        if job["status"] == "failed":
            error = job.get("error") or {}
            cls = _ERRORS_BY_CODE.get(error.get("code"), errors.Failed)
            raise cls(error.get("message", "job failed"), **error.get("details", {}))
        return job


def _error_from(response: httpx.Response) -> errors.ParvisorError:
    try:
        error = response.json()["error"]
        cls = _ERRORS_BY_CODE.get(error["code"], errors.Failed)
        if error["code"] == "wrong_state":
            exc = errors.Refused(error["message"], **error.get("details", {}))
            exc.code = "wrong_state"
            return exc
        return cls(error["message"], **error.get("details", {}))
    except (ValueError, KeyError, TypeError):
        return errors.Failed(f"HTTP {response.status_code}: {response.text[:200]}")
