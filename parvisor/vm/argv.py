"""The QEMU command line for one VM, built one device kind at a time.

Each ``*_args`` function returns the arguments for one concern (machine, CPUs, one
disk, one NIC, the console, ...). ``build_argv`` only concatenates them, so a new
device kind is one new small function plus a golden file, never an edit of a long one.

Names that other layers need to address devices later (hot-unplug, block jobs, tap
creation) come from the helpers here (``disk_node_names``, ``disk_device_id``,
``nic_device_id``, ``netdev_id``, ``tap_name``), so they are computed in one place.

This module must never start processes, touch files or speak QMP: it is pure, and
golden tests (``tests/unit/golden/argv``) pin its output.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from parvisor.model.vm import DiskBoot, DiskSpec, KernelBoot, NicSpec, VmDefinition
from parvisor.vm.paths import VmPaths

HOTPLUG_ROOT_PORTS = 8          # spare pcie-root-ports for later device_add
MEMORY_HOTPLUG_SLOTS = 8        # pc-dimm slots when max memory exceeds memory
AHCI_PORTS = 6                  # q35's built-in ICH9 AHCI has ide.0 .. ide.5
TAP_PREFIX = "pv"
IFNAMSIZ_MAX = 15               # Linux interface names: 15 chars + NUL
QGA_CHANNEL = "org.qemu.guest_agent.0"

# QEMU ids and node names: a letter first, then letters, digits, '-', '.', '_'.
# Node names are limited to 31 characters; keep room for our prefixes.
_SAFE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,22}$")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one QEMU for one VM."""

    definition: VmDefinition
    paths: VmPaths
    accelerator: Literal["kvm", "tcg"]
    qemu_binary: str = "qemu-system-x86_64"
    run_as: str | None = None
    incoming: bool = False
    start_paused: bool = False


# --- names shared with other layers -------------------------------------------------------
def tap_name(vm_uuid: str, nic_id: str) -> str:
    """Deterministic tap name for one NIC: ``pv`` + 13 hex digits (15 chars, IFNAMSIZ)."""
    digest = hashlib.sha256(f"{vm_uuid}/{nic_id}".encode()).hexdigest()
    return (TAP_PREFIX + digest)[:IFNAMSIZ_MAX]


def _safe_id(dev_id: str) -> str:
    """A device id usable inside QEMU ids; unusual ids are replaced by a stable hash."""
    if _SAFE_ID.match(dev_id):
        return dev_id
    return "h" + hashlib.sha256(dev_id.encode()).hexdigest()[:12]


def disk_node_names(disk: DiskSpec) -> tuple[str, str]:
    """(protocol node, format node) block node names of one disk."""
    safe = _safe_id(disk.id)
    return f"file-{safe}", f"fmt-{safe}"


def disk_device_id(disk: DiskSpec) -> str:
    return f"disk-{_safe_id(disk.id)}"


def netdev_id(nic: NicSpec) -> str:
    return f"net-{_safe_id(nic.id)}"


def nic_device_id(nic: NicSpec) -> str:
    return f"nic-{_safe_id(nic.id)}"


def opt(value: str) -> str:
    """Escape a value for QEMU's key=value option syntax (a ',' is written ',,')."""
    return value.replace(",", ",,")


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


# --- one function per concern --------------------------------------------------------------
def identity_args(spec: LaunchSpec) -> list[str]:
    d = spec.definition
    return ["-name", f"guest={opt(d.name)},debug-threads=on",
            "-uuid", d.uuid,
            "-smbios", f"type=1,uuid={d.uuid}"]


def base_args(spec: LaunchSpec) -> list[str]:
    # -nodefaults/-no-user-config: only the devices we list exist, whatever the host's
    # QEMU config says; -msg timestamp makes qemu.log readable after the fact.
    return ["-nodefaults", "-no-user-config", "-msg", "timestamp=on",
            "-display", "none", "-rtc", "base=utc"]


def machine_args(spec: LaunchSpec) -> list[str]:
    cpu = "host" if spec.accelerator == "kvm" else "max"
    return ["-machine", "q35", "-accel", spec.accelerator, "-cpu", cpu]


def smp_args(spec: LaunchSpec) -> list[str]:
    d = spec.definition
    max_vcpus = max(d.max_vcpus, d.vcpus)
    return ["-smp", f"cpus={d.vcpus},maxcpus={max_vcpus}"]


def memory_args(spec: LaunchSpec) -> list[str]:
    d = spec.definition
    mib = d.memory_bytes >> 20
    max_mib = max(d.max_memory_bytes, d.memory_bytes) >> 20
    if max_mib > mib:
        return ["-m", f"size={mib}M,slots={MEMORY_HOTPLUG_SLOTS},maxmem={max_mib}M"]
    return ["-m", f"size={mib}M"]


def boot_args(spec: LaunchSpec) -> list[str]:
    boot = spec.definition.boot
    if isinstance(boot, DiskBoot):
        return []    # disks carry bootindex; SeaBIOS boots the first one
    assert isinstance(boot, KernelBoot)
    # -kernel/-initrd/-append take raw strings, not option lists: no ',' escaping.
    args = ["-kernel", boot.kernel]
    if boot.initrd:
        args += ["-initrd", boot.initrd]
    if boot.cmdline:
        args += ["-append", boot.cmdline]
    return args


def hotplug_port_args(spec: LaunchSpec) -> list[str]:
    args: list[str] = []
    for index in range(HOTPLUG_ROOT_PORTS):
        args += ["-device", f"pcie-root-port,id=hotplug{index},bus=pcie.0,chassis={index + 1}"]
    return args


def disk_blockdev_args(disk: DiskSpec) -> list[str]:
    file_node, fmt_node = disk_node_names(disk)
    ro = _on_off(disk.readonly)
    return [
        "-blockdev",
        f"driver=file,node-name={file_node},filename={opt(disk.path)},read-only={ro}"
        ",discard=unmap",
        "-blockdev",
        f"driver={disk.format},node-name={fmt_node},file={file_node},read-only={ro}"
        ",discard=unmap",
    ]


def disk_device_args(disk: DiskSpec, *, ide_port: int | None, bootindex: int | None) -> list[str]:
    _, fmt_node = disk_node_names(disk)
    common = f"drive={fmt_node},id={disk_device_id(disk)}"
    if bootindex is not None:
        common += f",bootindex={bootindex}"
    if disk.bus == "virtio-blk":
        return ["-device", f"virtio-blk-pci,{common}"]
    if disk.bus == "virtio-scsi":
        return ["-device", f"scsi-hd,bus=scsi0.0,{common}"]
    # "ide" and "ahci" both sit on q35's built-in ICH9 AHCI controller. QEMU refuses a
    # read-only node under ide-hd ("Block node is read-only"); say so before launch.
    if disk.readonly:
        raise ValueError(f"disk {disk.id!r}: read-only disks need the virtio-blk or"
                         " virtio-scsi bus (QEMU's IDE disks cannot be read-only)")
    return ["-device", f"ide-hd,bus=ide.{ide_port},{common}"]


def scsi_controller_args(spec: LaunchSpec) -> list[str]:
    if any(d.bus == "virtio-scsi" for d in spec.definition.disks):
        return ["-device", "virtio-scsi-pci,id=scsi0"]
    return []


def disks_args(spec: LaunchSpec) -> list[str]:
    d = spec.definition
    boot_from_disk = isinstance(d.boot, DiskBoot)
    args: list[str] = []
    ide_port = 0
    for index, disk in enumerate(d.disks):
        port = None
        if disk.bus in ("ide", "ahci"):
            if ide_port >= AHCI_PORTS:
                raise ValueError(f"at most {AHCI_PORTS} ide/ahci disks are supported")
            port, ide_port = ide_port, ide_port + 1
        args += disk_blockdev_args(disk)
        args += disk_device_args(disk, ide_port=port,
                                 bootindex=index if boot_from_disk else None)
    return args


def nic_args(vm_uuid: str, nic: NicSpec) -> list[str]:
    # The tap is created and attached to its switch by the switch layer beforehand;
    # QEMU only opens it (script=no: QEMU must never run helper scripts).
    model = "virtio-net-pci" if nic.model == "virtio" else "e1000"
    return [
        "-netdev",
        f"tap,id={netdev_id(nic)},ifname={tap_name(vm_uuid, nic.id)},script=no,downscript=no",
        "-device", f"{model},netdev={netdev_id(nic)},id={nic_device_id(nic)},mac={nic.mac}",
    ]


def nics_args(spec: LaunchSpec) -> list[str]:
    args: list[str] = []
    for nic in spec.definition.nics:
        args += nic_args(spec.definition.uuid, nic)
    return args


def serial_args(spec: LaunchSpec) -> list[str]:
    # logfile= records the console even when no client is connected (a socket chardev
    # without a client drops output).
    p = spec.paths
    return ["-chardev",
            f"socket,id=serial0,path={opt(str(p.serial_socket))},server=on,wait=off"
            f",logfile={opt(str(p.console_log))},logappend=on",
            "-device", "isa-serial,chardev=serial0"]


def guest_agent_args(spec: LaunchSpec) -> list[str]:
    p = spec.paths
    return ["-chardev", f"socket,id=qga0,path={opt(str(p.qga_socket))},server=on,wait=off",
            "-device", "virtio-serial-pci,id=virtio-serial0",
            "-device", f"virtserialport,bus=virtio-serial0.0,chardev=qga0,name={QGA_CHANNEL}"]


def qmp_args(spec: LaunchSpec) -> list[str]:
    p = spec.paths
    return ["-chardev", f"socket,id=qmp0,path={opt(str(p.qmp_socket))},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control"]


def display_args(spec: LaunchSpec) -> list[str]:
    return ["-device", "VGA,id=video0", "-vnc", f"unix:{opt(str(spec.paths.vnc_socket))}"]


def sandbox_args(spec: LaunchSpec) -> list[str]:
    # spawn=deny: QEMU may never exec anything (so no exec: migration URIs).
    # With -runas QEMU itself calls setuid/setgid after the filter is installed, and
    # elevateprivileges=deny (or =children) forbids exactly those calls: allow them.
    elevate = "allow" if spec.run_as else "deny"
    return ["-sandbox",
            f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"]


def process_args(spec: LaunchSpec) -> list[str]:
    args = ["-pidfile", str(spec.paths.pidfile)]
    if spec.run_as:
        args += ["-runas", spec.run_as]
    return args


def start_args(spec: LaunchSpec) -> list[str]:
    args: list[str] = []
    if spec.start_paused or spec.incoming:
        args.append("-S")      # with incoming: resume explicitly once the state is loaded
    if spec.incoming:
        args += ["-incoming", "defer"]    # state arrives later through migrate-incoming fd:
    return args


_PARTS = (identity_args, base_args, machine_args, smp_args, memory_args, boot_args,
          hotplug_port_args, scsi_controller_args, disks_args, nics_args, serial_args,
          guest_agent_args, qmp_args, display_args, sandbox_args, process_args, start_args)


def build_argv(spec: LaunchSpec) -> list[str]:
    """The full command line: the binary, then each concern's arguments in order."""
    argv = [spec.qemu_binary]
    for part in _PARTS:
        argv += part(spec)
    return argv
