"""CPU weight and limit of one VM's QEMU process through the kernel's cgroups.

The only module that touches ``/sys/fs/cgroup``. Each VM gets
``<cpu hierarchy>/parvisor.slice/vm-<uuid>/``; the QEMU pid is moved in (all its threads
follow: ``cgroup.procs``) at launch and at re-adoption, and the group is removed once
QEMU has exited.

Two layouts are supported, because hosts differ:

* cgroup v2 (``cgroup.controllers`` at the root, or a ``unified`` mount that owns the
  ``cpu`` controller): ``cpu.weight`` (1..10000) and ``cpu.max`` ("quota period");
  the ``cpu`` controller must be enabled in each parent's ``cgroup.subtree_control``,
  which is done here.
* cgroup v1 ``cpu`` hierarchy (hybrid hosts, e.g. the CI machines, where v2 holds no
  controllers): ``cpu.shares`` (weight * 1024 / 100) and ``cpu.cfs_quota_us``.

The limit is a percentage of the VM's vCPUs (Hyper-V's "virtual machine limit"): 50 %
of 2 vCPUs is one host CPU. Pure helpers compute the values; ``CgroupHost`` writes them.
This module never decides whether a VM should be limited and never talks to QEMU.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from parvisor.errors import InvalidInput, VmError
from parvisor.model.vm import ResourceControls

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SLICE = "parvisor.slice"
CPU_PERIOD_US = 100_000


# --- pure values ----------------------------------------------------------------------------
def cpu_quota_us(limit_pct: int, vcpus: int, period_us: int = CPU_PERIOD_US) -> int | None:
    """Quota per period for ``limit_pct`` % of ``vcpus`` CPUs; None = unlimited."""
    if limit_pct <= 0:
        return None
    return max(1000, period_us * vcpus * limit_pct // 100)


def v1_shares(weight: int) -> int:
    return max(2, weight * 1024 // 100)


@dataclass(frozen=True)
class CpuSettings:
    """The files and values to write for one VM, per layout."""

    files: tuple[tuple[str, str], ...]


def cpu_settings(kind: Literal["v1", "v2"], resources: ResourceControls,
                 vcpus: int) -> CpuSettings:
    quota = cpu_quota_us(resources.cpu_limit_pct, vcpus)
    if kind == "v2":
        limit = f"{quota} {CPU_PERIOD_US}" if quota else f"max {CPU_PERIOD_US}"
        return CpuSettings((("cpu.weight", str(resources.cpu_weight)), ("cpu.max", limit)))
    return CpuSettings((("cpu.shares", str(v1_shares(resources.cpu_weight))),
                        ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                        ("cpu.cfs_quota_us", str(quota or -1))))


# --- the layout of this host ----------------------------------------------------------------
@dataclass(frozen=True)
class CpuHierarchy:
    kind: Literal["v1", "v2"]
    root: Path


def find_cpu_hierarchy(base: Path = CGROUP_ROOT) -> CpuHierarchy | None:
    """Where the ``cpu`` controller lives on this host, or None when nowhere usable."""
    for root in (base, base / "unified"):
        controllers = root / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return CpuHierarchy("v2", root)
    if (base / "cpu" / "cpu.cfs_quota_us").exists():
        return CpuHierarchy("v1", base / "cpu")
    return None


class CgroupHost:
    """Creates, fills, configures and removes the per-VM cgroups."""

    def __init__(self, hierarchy: CpuHierarchy | None) -> None:
        self.hierarchy = hierarchy

    @classmethod
    def detect(cls) -> "CgroupHost":
        return cls(find_cpu_hierarchy())

    @property
    def available(self) -> bool:
        return self.hierarchy is not None

    def vm_dir(self, vm_uuid: str) -> Path:
        assert self.hierarchy is not None
        return self.hierarchy.root / SLICE / f"vm-{vm_uuid}"

    def place(self, vm_uuid: str, pid: int) -> Path:
        """Create the VM's group (if needed) and move every QEMU thread into it."""
        hierarchy = self._require()
        path = self.vm_dir(vm_uuid)
        try:
            if hierarchy.kind == "v2":
                self._enable_cpu(hierarchy.root)
                (hierarchy.root / SLICE).mkdir(exist_ok=True)
                self._enable_cpu(hierarchy.root / SLICE)
            path.mkdir(parents=True, exist_ok=True)
            (path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            raise VmError(f"cannot put QEMU pid {pid} into {path}: {exc.strerror}",
                          path=str(path)) from exc
        return path

    def configure(self, vm_uuid: str, resources: ResourceControls, vcpus: int) -> None:
        hierarchy = self._require()
        path = self.vm_dir(vm_uuid)
        for name, value in cpu_settings(hierarchy.kind, resources, vcpus).files:
            try:
                (path / name).write_text(value + "\n")
            except OSError as exc:
                raise VmError(f"cannot set {path / name} to {value}: {exc.strerror}",
                              path=str(path / name)) from exc

    def usage_us(self, vm_uuid: str) -> int | None:
        """CPU time used by the group, in µs (v2 ``cpu.stat`` usage_usec)."""
        path = self.vm_dir(vm_uuid) / "cpu.stat"
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value)
        except OSError:
            return None
        return None

    def remove(self, vm_uuid: str) -> None:
        """Remove the group once QEMU has gone (an empty group only; never kills)."""
        if self.hierarchy is None:
            return
        try:
            self.vm_dir(vm_uuid).rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT,):
                log.warning("cgroup of VM %s not removed: %s", vm_uuid, exc.strerror)

    def _require(self) -> CpuHierarchy:
        if self.hierarchy is None:
            raise InvalidInput("this host has no usable cgroup cpu controller: CPU weight "
                               "and limit cannot be enforced")
        return self.hierarchy

    @staticmethod
    def _enable_cpu(parent: Path) -> None:
        control = parent / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            control.write_text("+cpu\n")
