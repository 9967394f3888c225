"""Where a VM's runtime files live: ``<state_dir>/vms/<uuid>/``.

One directory per VM, keyed by uuid (names can be reused after a delete; uuids not).
Everything QEMU needs at run time (sockets, pidfile, console log, saved state) is in
it, so deleting a VM is removing one directory, and the service can find running QEMUs
again after a restart by walking ``vms/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VmPaths:
    state_dir: Path
    uuid: str
    # a cluster keeps saved states on shared storage, so any host can restore them
    # (quick migration); None: in the VM's runtime dir
    saved_dir: Path | None = None

    @property
    def root(self) -> Path:
        return self.state_dir / "vms" / self.uuid

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def qga_socket(self) -> Path:
        return self.root / "qga.sock"

    @property
    def serial_socket(self) -> Path:
        return self.root / "serial.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.root / "vnc.sock"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def stderr_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def saved_state(self) -> Path:
        if self.saved_dir is not None:
            return self.saved_dir / self.uuid / "saved.state"
        return self.root / "saved.state"


def vms_dir(state_dir: Path) -> Path:
    return state_dir / "vms"
