"""Guest clustering for real: two tiny guests under QEMU TCG write one shared raw disk
(virtio-scsi scsi-hd, share-rw=on, cache=none) and each sees the other's writes.

The lab test (CI) is issue 5's case: two VMs of one anti-affinity group land on
different hosts of a two-host lab; the disk lives on the cluster's shared storage; one
VM has it from its start (QEMU argv), the other gets it hot-added while it runs (QMP),
so both paths are proven against each other. While both QEMUs hold it, a QEMU that
would open it as a plain disk (without share-rw) is refused by QEMU's image locking. The single-host test
(slow tier) is the same exchange without a cluster, a faster first check.

Guests write with ``dd oflag=direct conv=fsync`` and read with ``iflag=direct``, so
neither guest's page cache can hide the other's write; the disk is found by its size
and its serial (both VMs see the same one, derived from the file).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from parvisor.config import load_config
from parvisor.guest.agent import GuestAgent
from parvisor.testing.host_fixture import wait_for
from parvisor.testing.lab_fixture import LabUnderTest, running_lab

pytestmark = pytest.mark.qemu
SIZE_M = 64
SECTORS = SIZE_M << 11          # /sys/block/*/size counts 512-byte sectors
# readiness polls (not deadlines): two TCG guests boot at once on a loaded 2-core box
BOOT_S = 120
Wait = Callable[[Callable[[], object], float, str], object]


def write_marker(run: Callable[[str], str], device: str, text: str) -> None:
    # one 4 KiB block at offset 1 MiB, O_DIRECT and fsync: on the disk when dd returns
    run(f"printf '%-4096s' '{text}' | dd of={device} bs=4096 seek=256 count=1 "
        "oflag=direct conv=fsync 2>/dev/null")


def read_marker(run: Callable[[str], str], device: str) -> str:
    return run(f"dd if={device} bs=4096 skip=256 count=1 iflag=direct 2>/dev/null"
               " | tr -d '\\000'").strip()


def exchange(run_a: Callable[[str], str], run_b: Callable[[str], str], wait: Wait) -> None:
    """Both see one disk identity; A writes, B reads it; B writes, A reads it."""
    # a hot-added disk shows up once the guest's SCSI scan has run: poll for it
    disk_a, serial_a = wait(lambda: shared_disk(run_a), 30, "the shared disk in guest A")
    disk_b, serial_b = wait(lambda: shared_disk(run_b), 30, "the shared disk in guest B")
    assert serial_a.startswith("pvshared-") and serial_a == serial_b
    write_marker(run_a, disk_a, "written-by-A")
    assert read_marker(run_b, disk_b) == "written-by-A"
    write_marker(run_b, disk_b, "written-by-B")
    assert read_marker(run_a, disk_a) == "written-by-B"


def shared_disk(run: Callable[[str], str]) -> tuple[str, str] | None:
    """(device, SCSI serial) of the shared disk in one guest, None while it has none:
    the sd* disk of its size; the serial from VPD page 0x80 (4 header bytes first)."""
    found = run(f"for d in /sys/block/sd*; do [ \"$(cat $d/size)\" = {SECTORS} ] && "
                "echo /dev/${d##*/} $(tail -c +5 $d/device/vpd_pg80 | tr -d '\\000'); "
                "done").split()
    assert len(found) in (0, 2), f"expected one shared disk in the guest, found {found}"
    return (found[0], found[1]) if found else None


def plain_writer_refused(path: Path) -> None:
    """QEMU's image locking still protects the file from a VM that would open it as a
    plain disk (without share-rw): that QEMU refuses to start."""
    done = subprocess.run(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "q35",
         "-accel", "tcg", "-S", "-device", "virtio-scsi-pci,id=scsi0",
         "-blockdev", f"driver=file,node-name=f0,filename={path}",
         "-blockdev", "driver=raw,node-name=r0,file=f0",
         "-device", "scsi-hd,bus=scsi0.0,drive=r0"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and 'Failed to get shared "write" lock' in done.stderr, done


def give_to_qemu(path: Path, user: str) -> None:
    # QEMU opens a hot-added disk as its own (unprivileged) user, when that user exists
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    os.chown(path, entry.pw_uid, entry.pw_gid)


# --- one host (slow tier: the lab test below covers the same in CI) ---------------------------
@pytest.mark.slow
def test_two_vms_on_one_host_see_each_others_writes(host):
    root = host.state_dir / "storage"
    root.mkdir(exist_ok=True)
    shared = root / "quorum.raw"
    host.cli("disk", "create", str(shared), "--size", f"{SIZE_M}M", "--format", "raw")
    give_to_qemu(shared, load_config(host.state_dir).qemu_user)
    for name in ("gc1", "gc2"):
        host.create_tiny(name, "--memory", "128M")
    host.cli("vm", "disk", "add", "gc1", "--shared", str(shared))      # from its start
    host.cli("vm", "start", "gc1")
    host.cli("vm", "start", "gc2")
    host.wait_agent("gc1", timeout=BOOT_S)
    host.wait_agent("gc2", timeout=BOOT_S)
    host.cli("vm", "disk", "add", "gc2", "--shared", str(shared))      # hot-added
    assert [d["shared"] for d in host.vm("gc2")["disks"] if d["path"] == str(shared)] == [True]

    def guest(name: str) -> Callable[[str], str]:
        return lambda script: host.cli("vm", "exec", name, "--", "sh", "-c", script).stdout
    exchange(guest("gc1"), guest("gc2"), wait_for)
    plain_writer_refused(shared)
    for name in ("gc1", "gc2"):
        host.cli("vm", "delete", name, "--force")
    assert shared.exists()                         # belongs to no VM: never deleted


# --- two hosts (CI) ------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("ip") is None,
                    reason="needs etcd-server and iproute2 (root)")
def test_guest_cluster_nodes_on_two_hosts_share_a_disk(tiny_image):
    with running_lab(2) as lab:
        config = load_config(lab.lab.state_dir("h1"))
        shared = lab.lab.shared_dir / "gc-quorum.raw"
        local = next(r for r in config.storage_roots if r != lab.lab.shared_dir) / "gc.raw"
        for path in (shared, local):
            lab.on("h1", "disk", "create", str(path), "--size", f"{SIZE_M}M", "--format",
                   "raw")
        give_to_qemu(shared, config.qemu_user)
        for name in ("gca", "gcb"):
            lab.on("h1", "vm", "create", name, "--image", "tiny", "--memory", "128M",
                   "--anti-affinity", "gc")
        lab.on("h1", "vm", "disk", "add", "gca", "--shared", str(shared))
        refused = lab.on("h1", "vm", "disk", "add", "gcb", "--shared", str(local),
                         check=False)
        assert "not on the cluster's shared storage" in refused.stderr, refused
        placed = {name: _start(lab, name) for name in ("gca", "gcb")}  # boots overlap
        hosts = {name: host for name, (host, _) in placed.items()}
        assert sorted(hosts.values()) == ["h1", "h2"], hosts       # anti-affinity
        for name, (host, vm_uuid) in placed.items():
            lab.wait(lambda: _agent_answers(lab, host, vm_uuid), BOOT_S,
                     f"the guest agent of {name} on {host}", interval=0.5)
        lab.on(hosts["gcb"], "vm", "disk", "add", "gcb", "--shared", str(shared))

        def guest(name: str) -> Callable[[str], str]:
            return lambda script: lab.on(hosts[name], "vm", "exec", name, "--", "sh", "-c",
                                         script).stdout
        exchange(guest("gca"), guest("gcb"), lab.wait)
        plain_writer_refused(shared)         # lab down (running_lab) stops the VMs


def _start(lab: LabUnderTest, name: str) -> tuple[str, str]:
    """Start through the cluster: (the host the manager placed it on, its uuid)."""
    lab.on("h1", "vm", "start", name)
    vm_uuid = lab.vm_uuid("h1", name)
    host = lab.wait(lambda: (lambda found: found[0] if found else None)(
        lab.running_on(vm_uuid)), 40, f"{name} to run")
    return host, vm_uuid


def _agent_answers(lab: LabUnderTest, host: str, vm_uuid: str) -> bool:
    # straight to the agent socket in the host's state dir: a readiness poll that does
    # not start two CLI processes per try (the exchange itself goes through vm exec)
    agent = GuestAgent(lab.lab.state_dir(host) / "vms" / vm_uuid / "qga.sock")
    try:
        return asyncio.run(agent.exec(["true"], timeout=5)).exit_code == 0
    except Exception:      # noqa: BLE001 - not up yet
        return False
