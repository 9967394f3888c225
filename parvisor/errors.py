"""One error tree for all of parvisor.

Every error carries a stable machine-readable ``code``, a one-line human ``message``
and a ``details`` dict with context. The API turns them into HTTP responses with one
table (``http_status``); the CLI prints ``message`` on one line and exits 1.

Two branches matter to callers:

* ``Refused`` – the request was checked and turned down; **nothing changed**.
* ``Failed`` – execution started and something outside us failed (QEMU, the disk,
  the guest); the message says what state things were left in.

::

    ParvisorError
    ├── Refused                      (4xx, nothing changed)
    │   ├── InvalidInput             400  bad value, unknown field, path outside roots
    │   ├── NotFound                 404  unknown VM, job, image
    │   ├── AlreadyExists            409  duplicate name
    │   ├── StateError               409  action not allowed in the VM's current state
    │   ├── Busy                     409  another operation holds the VM
    │   ├── Unauthorized             401  missing or wrong API token / session
    │   └── Forbidden                403  the role does not allow the action
    └── Failed                       (5xx, execution failure)
        ├── VmError                  500  QEMU launch/QMP/process failures
        │   └── QmpError             500  a QMP command returned an error
        ├── GuestAgentError          502  the guest agent did not answer / failed
        ├── StorageError             500  qemu-img, image files
        ├── StoreError               500  the SQLite store
        ├── ImageError               500  building the tiny guest image
        ├── MigrationError           500  live migration did not happen; the source runs on
        │   ├── MigrationFailed      500  QEMU, the link or the destination failed / timed out
        │   └── MigrationCancelled   409  stopped on request (the VM stays where it was)
        └── ServiceUnavailable       503  the host service is not reachable (CLI side)
"""

from __future__ import annotations

from typing import Any


class ParvisorError(Exception):
    code = "error"
    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


# --- refusals: checked, turned down, nothing changed --------------------------------------
class Refused(ParvisorError):
    code = "refused"
    http_status = 400


class InvalidInput(Refused):
    code = "invalid_input"
    http_status = 400


class NotFound(Refused):
    code = "not_found"
    http_status = 404


class AlreadyExists(Refused):
    code = "already_exists"
    http_status = 409


class StateError(Refused):
    """An action is not allowed in the current state; names both states."""

    code = "wrong_state"
    http_status = 409

    def __init__(self, action: str, current: str, allowed: list[str] | tuple[str, ...], *,
                 vm: str | None = None) -> None:
        who = f"VM '{vm}'" if vm else "the VM"
        message = (f"cannot {action} {who}: it is {current}"
                   f" (allowed when {', '.join(sorted(allowed)) or 'never'})")
        super().__init__(message, action=action, current_state=current,
                         allowed_states=sorted(allowed), vm=vm)


class Busy(Refused):
    code = "busy"
    http_status = 409


class Unauthorized(Refused):
    code = "unauthorized"
    http_status = 401


class Forbidden(Refused):
    """Authenticated, but the role does not allow this (a viewer asking for a change)."""

    code = "forbidden"
    http_status = 403


# --- failures: execution went wrong ----------------------------------------------------
class Failed(ParvisorError):
    code = "failed"
    http_status = 500


class VmError(Failed):
    code = "vm_error"


class QmpError(VmError):
    code = "qmp_error"


class GuestAgentError(Failed):
    code = "guest_agent_error"
    http_status = 502


class StorageError(Failed):
    code = "storage_error"


class StoreError(Failed):
    code = "store_error"


class ImageError(Failed):
    code = "image_error"


class MigrationError(Failed):
    """A live migration did not complete. Raised only once the source VM is back in the
    state it had before (running again if it was running)."""

    code = "migration_error"


class MigrationFailed(MigrationError):
    code = "migration_failed"


class ReplicationFailed(Failed):
    """Disk replication could not start, broke, or a cycle did not complete."""

    code = "replication_failed"


class MigrationCancelled(MigrationError):
    """Cancelled on request: nothing moved, like a refusal, hence 409."""

    code = "migration_cancelled"
    http_status = 409


class ServiceUnavailable(Failed):
    code = "service_unavailable"
    http_status = 503
