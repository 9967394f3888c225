"""Media a new VM gets at create time: the tiny guest's boot disk and a cloud-init seed.

Both live in the VM's own directory under the first storage root,
``<root>/vms/<uuid>/`` (``boot.qcow2``, ``cidata.iso``), so they obey the storage-root
rules like any user disk. The tiny boot disk is a *differencing* child: its parent is a
copy of the built image's ``disk.qcow2`` placed once per content in
``<root>/images/tiny-<sha256 prefix>.qcow2``. Naming the parent by its content means
rebuilding the tiny image never changes a parent that children already point at (that
would silently corrupt them); many VMs share one parent.

``plan_media`` is pure (paths and DiskSpecs); ``create_media`` writes the files and
``remove_media`` undoes it when creating the VM fails afterwards. Deleting a VM keeps
its disks, like Hyper-V; ``parvisor disk delete`` removes them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from parvisor.errors import InvalidInput
from parvisor.image import cloudinit
from parvisor.image.tiny import TinyImage, load_tiny_image, sha256_file
from parvisor.model.vm import DiskBoot, DiskSpec, VmDefinition
from parvisor.ops.disks import vm_disk_dir
from parvisor.storage.disks import create_disk

if TYPE_CHECKING:
    from parvisor.config import HostConfig
    from parvisor.ops.requests import CreateVm

BOOT_DISK_FILE = "boot.qcow2"
SEED_DISK_ID = "cidata"
BOOT_DISK_ID = "boot"             # not disk0..N: those are attached disks


@dataclass(frozen=True)
class MediaPlan:
    vm_dir: Path
    boot_child: Path | None = None               # differencing child of the tiny disk
    seed: Path | None = None                     # cloud-init ISO
    seed_files: dict[str, bytes] | None = None


def plan_media(roots: tuple[Path, ...], vm_uuid: str, vm_name: str, *, tiny_disk: bool,
               user_data: str | None, ssh_keys: list[str]) -> MediaPlan:
    vm_dir = vm_disk_dir(roots, vm_uuid)
    seed_files = None
    if user_data is not None or ssh_keys:
        seed_files = cloudinit.seed_files(vm_uuid, vm_name, user_data or "", ssh_keys)
    return MediaPlan(vm_dir=vm_dir,
                     boot_child=vm_dir / BOOT_DISK_FILE if tiny_disk else None,
                     seed=vm_dir / cloudinit.SEED_FILE if seed_files else None,
                     seed_files=seed_files)


def disk_specs(plan: MediaPlan, os_type: Literal["linux", "windows", "other"]) -> list[DiskSpec]:
    """The planned media as the VM's drives (boot disk first)."""
    windows = os_type == "windows"
    specs = []
    if plan.boot_child is not None:
        # Windows has no inbox virtio driver: its disks go on AHCI until drivers exist.
        specs.append(DiskSpec(id=BOOT_DISK_ID, path=str(plan.boot_child), format="qcow2",
                              bus="ahci" if windows else "virtio-blk", owned=True))
    if plan.seed is not None:
        # The tiny (cloud) kernel has no AHCI driver: Linux gets the CD on virtio-scsi.
        specs.append(DiskSpec(id=SEED_DISK_ID, path=str(plan.seed), format="raw",
                              media="cdrom", readonly=True, owned=True,
                              bus="ahci" if windows else "virtio-scsi"))
    return specs


def shared_tiny_base(image: TinyImage, roots: tuple[Path, ...]) -> Path:
    """The content-named copy of the tiny disk in the storage root (copied once)."""
    assert image.disk is not None
    base = Path(roots[0]) / "images" / f"tiny-{sha256_file(image.disk)[:16]}.qcow2"
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        partial = base.with_name(f".{base.name}.partial-{os.getpid()}")
        shutil.copyfile(image.disk, partial)
        partial.chmod(0o444)              # a parent of differencing disks: never written
        os.replace(partial, base)
    return base


def create_media(plan: MediaPlan, image: TinyImage | None, roots: tuple[Path, ...]) -> None:
    if plan.boot_child is not None:
        assert image is not None
        create_disk(plan.boot_child, roots, size=None, fmt="qcow2",
                    parent=shared_tiny_base(image, roots))
    if plan.seed is not None and plan.seed_files is not None:
        cloudinit.write_seed_iso(plan.seed, plan.seed_files)


def remove_media(plan: MediaPlan) -> None:
    for path in (plan.boot_child, plan.seed):
        if path is not None:
            path.unlink(missing_ok=True)
    try:
        plan.vm_dir.rmdir()                   # only when empty: never someone else's file
    except OSError:
        pass


# --- the create path (called by VmManager.create) ------------------------------------
def platform_fields(request: "CreateVm") -> dict[str, Any]:
    """Definition fields for firmware and guest OS, straight from the request."""
    return {"generation": request.generation, "secure_boot": request.secure_boot,
            "tpm": request.tpm, "os_type": request.os_type}


def _check_boot_request(request: "CreateVm") -> bool:
    """True when the VM boots the tiny image's disk; InvalidInput for nonsense."""
    if request.boot != "disk":
        return False
    if request.image != "tiny":
        raise InvalidInput("--boot disk needs --image tiny (other VMs boot from the disks "
                           "they are given)")
    if request.cmdline:
        raise InvalidInput("--cmdline does not apply to --boot disk: the disk's GRUB "
                           "carries the tiny image's command line")
    return True


def plan_for(definition: VmDefinition, request: "CreateVm",
             config: "HostConfig") -> tuple[VmDefinition, MediaPlan, TinyImage | None]:
    """The definition with the planned media added (boot disk first), and the plan."""
    from parvisor.ops.vms import validated_definition
    roots = tuple(config.storage_roots)
    tiny_disk = _check_boot_request(request)
    image = load_tiny_image(config.state_dir) if tiny_disk else None
    if tiny_disk and (image is None or image.disk is None):
        raise InvalidInput("the tiny image has no boot disk yet: run "
                           "'parvisor image build-tiny --force'")
    plan = plan_media(roots, definition.uuid, definition.name, tiny_disk=tiny_disk,
                      user_data=request.cloud_init_user_data, ssh_keys=request.ssh_keys)
    new = disk_specs(plan, definition.os_type)
    if not new:
        return definition, plan, image
    data = definition.model_dump()
    boot_disks = [d.model_dump() for d in new if d.media == "disk"]
    cds = [d.model_dump() for d in new if d.media == "cdrom"]
    data["disks"] = [*boot_disks, *data["disks"], *cds]
    if tiny_disk:
        data["boot"] = DiskBoot().model_dump()
    return validated_definition(data), plan, image


@contextlib.contextmanager
def created(plan: MediaPlan, image: TinyImage | None, roots: tuple[Path, ...]) -> Iterator[None]:
    """Create the planned files; remove them again when the body (the store write) fails."""
    try:
        create_media(plan, image, roots)
        yield
    except BaseException:
        remove_media(plan)
        raise
