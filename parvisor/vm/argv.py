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
from parvisor.vm.firmware import cpu_model, firmware_args, machine_type, rtc_base
from parvisor.vm.paths import VmPaths

HOTPLUG_ROOT_PORTS = 8          # spare pcie-root-ports for later device_add
MEMORY_HOTPLUG_SLOTS = 8        # pc-dimm slots when max memory exceeds memory
VIRTIO_MEM_BLOCK = 2 << 20      # QEMU's default virtio-mem block size on x86 (THP size)
VIRTIO_MEM_ID = "vmem0"         # the one virtio-mem device (memory above the boot size)
BALLOON_ID = "balloon0"         # virtio-balloon of dynamic-memory VMs
SCSI_CONTROLLER_ID = "scsi0"
HOTPLUG_PORT_PREFIX = "hotplug"
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
    # disk ids whose files sit where O_DIRECT fails (e.g. old tmpfs): host page cache
    buffered_disks: frozenset[str] = frozenset()
    # cluster CPU baseline (processor compatibility mode): a named QEMU CPU model every
    # host runs, so the VM can move between hosts with different CPUs; None: host/max
    cpu_baseline: str | None = None
    machine_version: str | None = None      # versioned machine type (migration target)


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


def shared_disk_serial(disk: DiskSpec) -> str:
    """The SCSI serial of a shared disk: derived from its file, so every VM of a guest
    cluster sees the same disk identity (VPD pages 0x80/0x83; cluster software and
    /dev/disk/by-id match nodes' disks by it). 23 characters (scsi-hd allows 36)."""
    assert disk.path is not None
    return "pvshared-" + hashlib.sha256(disk.path.encode()).hexdigest()[:14]


def shared_disk_props(disk: DiskSpec) -> dict[str, str]:
    """Extra scsi-hd properties of a shared disk (argv and hot-add use the same).

    share-rw=on: the device does not ask for exclusive write access, so QEMU's image
    locking lets every QEMU whose device also says share-rw open the file for writing,
    and still refuses a QEMU that would open it without (a plain disk of the same file).
    """
    if not disk.shared:
        return {}
    return {"share-rw": "on", "serial": shared_disk_serial(disk)}


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
            "-display", "none", "-rtc", f"base={rtc_base(spec.definition)}"]


def machine_args(spec: LaunchSpec) -> list[str]:
    # Machine options and CPU model depend on generation / OS: see parvisor.vm.firmware.
    d = spec.definition
    machine = machine_type(d)
    if spec.machine_version:
        # an incoming migration runs exactly the source's versioned type (pc-q35-7.2):
        # the alias q35 may mean a newer, incompatible one on this host
        machine = ",".join((spec.machine_version, *machine.split(",")[1:]))
    return ["-machine", machine, "-accel", spec.accelerator,
            "-cpu", cpu_model(d, spec.accelerator, spec.cpu_baseline)]


def smp_args(spec: LaunchSpec) -> list[str]:
    d = spec.definition
    max_vcpus = max(d.max_vcpus, d.vcpus)
    return ["-smp", f"cpus={d.vcpus},maxcpus={max_vcpus}"]


def virtio_mem_region(definition: VmDefinition) -> int:
    """Bytes of the virtio-mem region: max memory above the boot size, in whole blocks."""
    if definition.dynamic_memory or definition.memory_hotplug != "virtio-mem":
        return 0
    spare = max(0, definition.max_memory_bytes - definition.memory_bytes)
    return spare - spare % VIRTIO_MEM_BLOCK


def memory_args(spec: LaunchSpec) -> list[str]:
    # The boot size is the current memory_bytes, so a restart comes back with what the
    # VM had; what may be added later sits above it (docs/hot-add.md). Dynamic memory
    # boots with its max and the balloon takes the guest down to its target at once.
    d = spec.definition
    if d.dynamic_memory:
        return ["-m", f"size={max(d.dynamic_memory.max_bytes, d.memory_bytes) >> 20}M"]
    mib = d.memory_bytes >> 20
    region = virtio_mem_region(d)
    if region:
        return ["-m", f"size={mib}M,maxmem={(d.memory_bytes + region) >> 20}M",
                "-object", f"memory-backend-ram,id={VIRTIO_MEM_ID}-mem,size={region >> 20}M",
                "-device", f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_ID}-mem"
                           ",requested-size=0"]
    max_mib = max(d.max_memory_bytes, d.memory_bytes) >> 20
    if max_mib > mib and d.memory_hotplug == "dimm":
        return ["-m", f"size={mib}M,slots={MEMORY_HOTPLUG_SLOTS},maxmem={max_mib}M"]
    return ["-m", f"size={mib}M"]


def balloon_args(spec: LaunchSpec) -> list[str]:
    # Only dynamic-memory VMs: the guest statistics it reports drive the host policy.
    if not spec.definition.dynamic_memory:
        return []
    return ["-device", f"virtio-balloon-pci,id={BALLOON_ID}"]


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
        args += ["-device", f"pcie-root-port,id={HOTPLUG_PORT_PREFIX}{index},bus=pcie.0"
                            f",chassis={index + 1}"]
    return args


def disk_cache_options(direct_io: bool = True) -> str:
    """Cache and AIO mode of a disk's nodes (docs/io-model.md explains the choice).

    cache.direct=on (O_DIRECT): guest data bypasses the host page cache, so a VM's
    memory is not counted twice, host memory pressure cannot stall guest writes, and
    live migration sees no stale host cache. Flushes are still passed through
    (cache.no-flush=off), and the device keeps its write cache on, so the guest's own
    fsync/FUA decide durability: safe. aio=native (Linux AIO) needs O_DIRECT and is the
    long-proven fast path; io_uring is faster on new kernels but is often blocked by
    container seccomp profiles. Where O_DIRECT is unavailable, aio=threads with the
    host page cache is the only mode that opens at all.
    """
    if direct_io:
        return "cache.direct=on,aio=native"
    return "cache.direct=off,aio=threads"


def disk_blockdev_args(disk: DiskSpec, *, direct_io: bool = True) -> list[str]:
    assert disk.path is not None, "an empty CD drive has no block nodes"
    file_node, fmt_node = disk_node_names(disk)
    ro = _on_off(disk.readonly)
    cache = disk_cache_options(direct_io)
    # The format node repeats cache.direct so that backing files QEMU opens below it
    # (differencing disks) inherit O_DIRECT too. discard=unmap passes guest TRIM down
    # so thin images shrink; detect-zeroes=unmap turns written zero blocks into
    # discards (a guest zeroing a disk keeps the image thin). Both only for writers.
    writes = "" if disk.readonly else ",discard=unmap"
    zeroes = "" if disk.readonly else ",detect-zeroes=unmap"
    return [
        "-blockdev",
        f"driver=file,node-name={file_node},filename={opt(disk.path)},read-only={ro}"
        f",{cache}{writes}",
        "-blockdev",
        f"driver={disk.format},node-name={fmt_node},file={file_node},read-only={ro}"
        f",cache.direct={_on_off(direct_io)}{writes}{zeroes}",
    ]


def cdrom_device_args(disk: DiskSpec, *, ide_port: int | None,
                      bootindex: int | None) -> list[str]:
    # An empty drive has no drive=; QEMU gives it an anonymous backend so a medium can
    # be inserted later over QMP (blockdev-change-medium on the device id).
    props = f"id={disk_device_id(disk)}"
    if disk.path is not None:
        props = f"drive={disk_node_names(disk)[1]},{props}"
    if bootindex is not None:
        props += f",bootindex={bootindex}"
    if disk.bus == "virtio-scsi":
        return ["-device", f"scsi-cd,bus=scsi0.0,{props}"]
    return ["-device", f"ide-cd,bus=ide.{ide_port},{props}"]


def disk_device_args(disk: DiskSpec, *, ide_port: int | None, bootindex: int | None) -> list[str]:
    if disk.media == "cdrom":
        return cdrom_device_args(disk, ide_port=ide_port, bootindex=bootindex)
    _, fmt_node = disk_node_names(disk)
    common = f"drive={fmt_node},id={disk_device_id(disk)}"
    if bootindex is not None:
        common += f",bootindex={bootindex}"
    if disk.bus == "virtio-blk":
        return ["-device", f"virtio-blk-pci,{common}"]
    if disk.bus == "virtio-scsi":
        extra = "".join(f",{key}={value}" for key, value in shared_disk_props(disk).items())
        return ["-device", f"scsi-hd,bus=scsi0.0,{common}{extra}"]
    # "ide" and "ahci" both sit on q35's built-in ICH9 AHCI controller. QEMU refuses a
    # read-only node under ide-hd ("Block node is read-only"); say so before launch.
    if disk.readonly:
        raise ValueError(f"disk {disk.id!r}: read-only disks need the virtio-blk or"
                         " virtio-scsi bus (QEMU's IDE disks cannot be read-only)")
    return ["-device", f"ide-hd,bus=ide.{ide_port},{common}"]


def scsi_controller_args(spec: LaunchSpec) -> list[str]:
    if any(d.bus == "virtio-scsi" for d in spec.definition.disks):
        return ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER_ID}"]
    return []


def boot_indexes(definition: VmDefinition) -> dict[str, int]:
    """bootindex per device id: the explicit boot order, else (booting from disk) the
    disks in their order; a kernel boot needs none (-kernel wins)."""
    if definition.boot_order:
        return {dev_id: index for index, dev_id in enumerate(definition.boot_order)}
    if isinstance(definition.boot, DiskBoot):
        return {disk.id: index for index, disk in enumerate(definition.disks)}
    return {}


def disks_args(spec: LaunchSpec) -> list[str]:
    d = spec.definition
    bootindex = boot_indexes(d)
    args: list[str] = []
    ide_port = 0
    for disk in d.disks:
        port = None
        if disk.bus in ("ide", "ahci"):
            if ide_port >= AHCI_PORTS:
                raise ValueError(f"at most {AHCI_PORTS} ide/ahci disks are supported")
            port, ide_port = ide_port, ide_port + 1
        if disk.path is not None:
            # a shared disk is always cache=none: a host page cache would hold writes
            # and stale reads between the cluster's nodes (refused at add where
            # O_DIRECT fails)
            direct = disk.shared or disk.id not in spec.buffered_disks
            args += disk_blockdev_args(disk, direct_io=direct)
        args += disk_device_args(disk, ide_port=port, bootindex=bootindex.get(disk.id))
    return args


def nic_args(vm_uuid: str, nic: NicSpec, bootindex: int | None = None) -> list[str]:
    # The tap is created and attached to its switch by the switch layer beforehand;
    # QEMU only opens it (script=no: QEMU must never run helper scripts).
    model = "virtio-net-pci" if nic.model == "virtio" else "e1000"
    device = f"{model},netdev={netdev_id(nic)},id={nic_device_id(nic)},mac={nic.mac}"
    if bootindex is not None:
        # A NIC in the boot order network-boots (PXE): the firmware runs the device's
        # option ROM (iPXE from ipxe-qemu, BIOS or EFI flavour) at that position.
        device += f",bootindex={bootindex}"
    return [
        "-netdev",
        f"tap,id={netdev_id(nic)},ifname={tap_name(vm_uuid, nic.id)},script=no,downscript=no",
        "-device", device,
    ]


def nics_args(spec: LaunchSpec) -> list[str]:
    bootindex = boot_indexes(spec.definition)
    args: list[str] = []
    for nic in spec.definition.nics:
        args += nic_args(spec.definition.uuid, nic, bootindex.get(nic.id))
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


_PARTS = (identity_args, base_args, machine_args, firmware_args, smp_args, memory_args,
          balloon_args, boot_args,
          hotplug_port_args, scsi_controller_args, disks_args, nics_args, serial_args,
          guest_agent_args, qmp_args, display_args, sandbox_args, process_args, start_args)


def build_argv(spec: LaunchSpec) -> list[str]:
    """The full command line: the binary, then each concern's arguments in order."""
    argv = [spec.qemu_binary]
    for part in _PARTS:
        argv += part(spec)
    return argv
