"""Live migration engine against real QEMU (TCG): two QEMUs of one tiny guest on this
host, migrating over 127.0.0.1.

What the guest sees at the switch, under TCG: its clock (TSC on QEMU's virtual clock)
does not advance while the VM is stopped, so the stop-and-copy pause itself is not in
its timestamps. Yet its 10 ms loop (30-40 ms in practice: one vCPU shared with the
rewrite loop) shows a gap of 130-310 ms around the switch, against QEMU-reported
downtimes of 15-80 ms and 25-95 ms from the source's STOP event to the destination
running (host clock). Most likely the destination's TCG starting with an empty
translation cache: every guest code path is translated again right after ``cont``.
KVM has no such cost. GAP_TOLERANCE_MS states the allowance.

Every QEMU is stopped by PID in ``finally`` (``QemuSet.close``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time

import pytest

from parvisor.cluster.certs import make_ca
from parvisor.errors import MigrationCancelled, MigrationFailed
from parvisor.migration.engine import (MigrationProgress, abort_incoming, export_disks,
                                       free_port, migrate_out, mirror_disks, mirrored_nodes,
                                       prepare_incoming, resume_incoming, stop_export)
from parvisor.migration.policy import ConvergencePolicy
from parvisor.migration.tls import write_tls_dir
from parvisor.storage.qemu_img import create_image, inspect_image
from parvisor.testing.guest_fixtures import qemu_available, short_state_dir, wait_until
from parvisor.testing.migration_fixtures import (QemuSet, TcpRelay, counter, guest_uptime, sh,
                                                 start_workload, timestamp_log,
                                                 tiny_definition)

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 missing")]

HOST = "127.0.0.1"
# Largest gap the guest may see in its timestamp log at the switch, on top of QEMU's
# reported downtime (see the module docstring): measured up to 310 ms on the 2-core TCG
# box under load; the allowance leaves room for a busier CI machine.
GAP_TOLERANCE_MS = 600.0
SWITCH_WINDOW_S = 0.15


async def test_migrates_a_busy_guest_and_it_keeps_running(tiny_image, qemus: QemuSet) -> None:
    definition = tiny_definition(tiny_image)
    source, agent = await qemus.boot(definition)
    await start_workload(agent, dirty_mib=32)
    await wait_until(lambda: counter(agent), 30, "the workload counter")
    uptime_before = await guest_uptime(agent)
    count_before = await counter(agent)

    dest = await qemus.incoming(definition)
    start_uptime = await guest_uptime(agent)
    policy = ConvergencePolicy()
    uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy)
    progress: list[MigrationProgress] = []
    stopped_at: list[float] = []
    source_stop = source.expect_event("STOP", lambda d: True)
    source_stop.add_done_callback(lambda _: stopped_at.append(time.monotonic()))
    result = await migrate_out(source, uri, policy, on_progress=progress.append)
    assert (await source.query_status()).status == "postmigrate"
    await resume_incoming(dest)
    resumed_at = time.monotonic()
    dest_agent = type(agent)(dest.paths.qga_socket)
    asked = time.monotonic()
    uptime_after = await guest_uptime(dest_agent)
    # the guest's uptime at the moment it was resumed (its clock ran since then)
    switch_uptime = uptime_after - ((asked + time.monotonic()) / 2 - resumed_at)
    await source.quit()
    await source.wait_exited()

    assert (await dest.query_status()).running
    count_after = await counter(dest_agent)
    assert uptime_after >= uptime_before, "the guest rebooted"
    assert count_after > count_before
    await wait_until(lambda: _greater(counter(dest_agent), count_after), 10,
                     "the counter to go on on the destination")

    assert result.downtime_ms > 0 and result.transferred_bytes > 0
    assert result.total_time_ms >= result.downtime_ms and result.passes >= 1
    assert result.setup_time_ms >= 0 and result.downtime_limit_ms >= policy.max_downtime_ms
    assert progress and progress[-1].status == "completed"
    assert any(p.ram_total > 0 for p in progress)

    rows = await timestamp_log(dest_agent)
    gaps = [(t1, t2, (t2 - t1) * 1000) for (_, t1), (_, t2) in zip(rows, rows[1:])]
    # the gaps whose interval touches the switch (+- SWITCH_WINDOW_S for the agent's
    # round trip, which dates the switch in guest time)
    at_switch = max(gap for t1, t2, gap in gaps if t2 >= switch_uptime - SWITCH_WINDOW_S
                    and t1 <= switch_uptime + SWITCH_WINDOW_S)
    during = max(gap for t1, t2, gap in gaps if t2 >= start_uptime)
    quiet = max(gap for t1, t2, gap in gaps if t2 < start_uptime)   # same guest, no move
    host_pause_ms = (resumed_at - stopped_at[0]) * 1000 if stopped_at else float("nan")
    print(f"migration: total {result.total_time_ms} ms, downtime {result.downtime_ms} ms"
          f" (limit {result.downtime_limit_ms} ms), passes {result.passes},"
          f" transferred {result.transferred_bytes >> 20} MiB; guest-visible gap at the"
          f" switch {at_switch:.0f} ms, largest while migrating {during:.0f} ms, before"
          f" {quiet:.0f} ms; host-side pause incl. resume {host_pause_ms:.1f} ms")
    assert at_switch <= result.downtime_ms + GAP_TOLERANCE_MS


async def _greater(value, than: int) -> bool:
    return (await value) > than


@pytest.mark.slow   # CI budget: test_migration_lab moves a disk with a running VM in CI
async def test_shared_nothing_copies_the_disk(tiny_image, qemus: QemuSet) -> None:
    work = short_state_dir("pvd-")
    qemus.dirs.append(work)
    src_img, dst_img = work / "src.qcow2", work / "dst.qcow2"
    create_image(src_img, "qcow2", 64 << 20)
    create_image(dst_img, "qcow2", 64 << 20)
    disk = {"id": "vdb", "path": str(src_img), "format": "qcow2"}
    definition = tiny_definition(tiny_image, disks=(disk,))
    source, agent = await qemus.boot(definition)
    await sh(agent, "mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt"
                    " && dd if=/dev/urandom of=/mnt/before bs=1M count=4 2>/dev/null"
                    " && sync && md5sum /mnt/before > /tmp/sums")
    # keeps writing during the copy and the RAM migration
    await sh(agent, "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i >> /mnt/during;"
                    " sync; usleep 20000; done' </dev/null >/dev/null 2>&1 &")

    dest_def = definition.model_copy(update={"disks": (
        definition.disks[0].model_copy(update={"path": str(dst_img)}),)})
    dest = await qemus.incoming(dest_def)
    policy = ConvergencePolicy()
    nodes = mirrored_nodes(definition)
    assert nodes == ["fmt-vdb"]
    uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy)
    nbd = await export_disks(dest, HOST, free_port(HOST), nodes)
    disk_progress: list[MigrationProgress] = []
    await mirror_disks(source, nbd, nodes, disk_progress.append)
    assert disk_progress and disk_progress[-1].disk_remaining == 0
    assert disk_progress[-1].disk_total >= 64 << 20    # grows with writes during the copy
    # written while the mirror is ready, before the RAM moves
    await sh(agent, "dd if=/dev/urandom of=/mnt/mid bs=1M count=2 2>/dev/null && sync"
                    " && md5sum /mnt/mid >> /tmp/sums")
    result = await migrate_out(source, uri, policy, mirroring=True)
    await stop_export(dest)
    await resume_incoming(dest)
    await source.quit()
    await source.wait_exited()

    dest_agent = type(agent)(dest.paths.qga_socket)
    out = await sh(dest_agent, "md5sum -c /tmp/sums && sync && echo 3 >"
                               " /proc/sys/vm/drop_caches && md5sum -c /tmp/sums"
                               " && tail -n 1 /mnt/during")
    assert out.count(": OK") == 4
    last = int(out.split()[-1])
    await wait_until(lambda: _during_beyond(dest_agent, last), 10,
                     "the guest to keep writing on the destination disk")
    print(f"shared-nothing: downtime {result.downtime_ms} ms, total {result.total_time_ms} ms")
    await dest.stop()
    for image in (dst_img, src_img):
        done = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert inspect_image(src_img, "qcow2").virtual_size == 64 << 20


async def _during_beyond(agent, last: int) -> bool:
    return int((await sh(agent, "tail -n 1 /mnt/during")).strip() or 0) > last


async def test_destination_killed_or_cancel_leaves_the_source_running(
        tiny_image, qemus: QemuSet) -> None:
    definition = tiny_definition(tiny_image)
    source, agent = await qemus.boot(definition)
    await start_workload(agent, dirty_mib=32)
    # slow link: the transfer takes several seconds, so 30 % is observable
    policy = ConvergencePolicy(bandwidth_bytes_per_s=12 << 20)

    # 1. the destination dies at ~30 % of the transfer
    dest = await qemus.incoming(definition)
    uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy)
    killed: list[float] = []

    def kill_at_30(progress: MigrationProgress) -> None:
        if not killed and progress.ram_total and progress.transferred > 0.3 * _payload():
            os.kill(dest.pid, signal.SIGKILL)
            killed.append(progress.transferred / progress.ram_total)

    with pytest.raises(MigrationFailed) as caught:
        await migrate_out(source, uri, policy, on_progress=kill_at_30)
    assert killed, "the migration ended before the destination could be killed"
    print(f"destination killed: {caught.value.message}")
    await abort_incoming(dest)
    await _assert_running(source, agent)

    # 2. cancelled on request halfway
    dest = await qemus.incoming(definition)
    uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy)
    seen: list[MigrationProgress] = []
    with pytest.raises(MigrationCancelled):
        await migrate_out(source, uri, policy, on_progress=seen.append,
                          cancelled=lambda: bool(seen) and
                          seen[-1].transferred > 0.3 * _payload())
    await abort_incoming(dest)
    await _assert_running(source, agent)


def _payload() -> int:
    """About what a 192 MiB tiny guest with the workload puts on the wire in its first
    pass (measured 80-130 MiB in all; zero pages cost almost nothing), so 30 % of it is
    ~24 MiB: two seconds into a 12 MiB/s transfer."""
    return 80 << 20


async def _assert_running(source, agent) -> None:
    assert (await source.query_status()).running
    before = await counter(agent)
    await wait_until(lambda: _greater(counter(agent), before), 10, "the counter to go on")
    info = await source.qmp.execute("query-migrate")
    assert info["status"] in ("cancelled", "failed")
    caps = {c["capability"]: c["state"]
            for c in await source.qmp.execute("query-migrate-capabilities")}
    assert not caps["return-path"], "settings must be reset for a later save"


async def test_tls_hides_guest_memory_on_the_wire(tiny_image, qemus: QemuSet) -> None:
    work = short_state_dir("pvt-")
    qemus.dirs.append(work)
    ca = make_ca(work / "ca", "test")
    tls_dir = write_tls_dir(work / "tls", ca, hosts=(HOST, "localhost"))
    marker = secrets.token_hex(8)[:15]           # + "\n" = 16 bytes, repeated 4 MiB
    definition = tiny_definition(tiny_image, memory="160M")
    source, agent = await qemus.boot(definition)
    await sh(agent, f"yes {marker} | head -c 4194304 > /tmp/marker")
    policy = ConvergencePolicy()

    async def migrate_via_relay(src, tls: bool):
        dest = await qemus.incoming(definition)
        port = free_port(HOST)
        await prepare_incoming(dest, HOST, port, policy=policy,
                               tls_creds_dir=tls_dir if tls else None)
        relay = TcpRelay(HOST, port)
        relay_port = await relay.start(HOST)
        try:
            await migrate_out(src, f"tcp:{HOST}:{relay_port}", policy,
                              tls_creds_dir=tls_dir if tls else None)
            await resume_incoming(dest)
        finally:
            await relay.close()
        await src.quit()
        await src.wait_exited()
        return dest, relay

    dest, plain = await migrate_via_relay(source, tls=False)
    assert marker.encode() in plain.upstream
    dest2, encrypted = await migrate_via_relay(dest, tls=True)
    assert len(encrypted.upstream) > 1 << 20
    assert marker.encode() not in encrypted.upstream
    dest_agent = type(agent)(dest2.paths.qga_socket)
    assert (await sh(dest_agent, "head -c 16 /tmp/marker")).strip() == marker
    print(f"relay: plain {len(plain.upstream) >> 20} MiB, TLS {len(encrypted.upstream) >> 20}"
          " MiB")
