"""Slow tier (``./setup.sh test --slow``): live migration loops and the rarer paths.

- 10 consecutive migrations of one busy guest back and forth (no QEMU leaks, the guest
  never reboots, the counter never stops, settings reset after each move);
- post-copy on a link too slow for pre-copy, with the destination resumed from the
  ``on_postcopy`` hook;
- shared-nothing over TLS (migration stream and NBD both encrypted).
"""

from __future__ import annotations

import pytest

from parvisor.cluster.certs import make_ca
from parvisor.guest.agent import GuestAgent
from parvisor.migration.engine import (export_disks, free_port, migrate_out, mirror_disks,
                                       mirrored_nodes, prepare_incoming,
                                       reset_migration_settings, resume_incoming,
                                       stop_export)
from parvisor.migration.policy import ConvergencePolicy
from parvisor.migration.tls import write_tls_dir
from parvisor.storage.qemu_img import create_image
from parvisor.testing.guest_fixtures import pid_alive, short_state_dir, wait_until
from parvisor.testing.migration_fixtures import (QemuSet, counter, guest_uptime, sh,
                                                 start_workload, tiny_definition)

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

HOST = "127.0.0.1"


async def test_ten_migrations_back_and_forth(tiny_image, qemus: QemuSet) -> None:
    definition = tiny_definition(tiny_image)
    holder, agent = await qemus.boot(definition)
    await start_workload(agent, dirty_mib=32)
    policy = ConvergencePolicy()
    uptime, count = await guest_uptime(agent), await counter(agent)
    downtimes = []
    for _ in range(10):
        dest = await qemus.incoming(definition)
        uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy)
        result = await migrate_out(holder, uri, policy)
        await resume_incoming(dest)
        await holder.quit()
        await holder.wait_exited()
        assert not pid_alive(holder.pid)
        downtimes.append(result.downtime_ms)
        holder, agent = dest, GuestAgent(dest.paths.qga_socket)
        now_uptime, now_count = await guest_uptime(agent), await counter(agent)
        assert now_uptime >= uptime and now_count >= count
        uptime, count = now_uptime, now_count
        caps = {c["capability"]: c["state"]
                for c in await holder.qmp.execute("query-migrate-capabilities")}
        assert not any(caps.values()), caps
    alive = [p for p in qemus.procs if not p.exited]
    assert alive == [holder]
    print(f"10 migrations, downtimes (ms): {downtimes}")


async def test_postcopy_when_precopy_cannot_converge(tiny_image, qemus: QemuSet) -> None:
    definition = tiny_definition(tiny_image)
    source, agent = await qemus.boot(definition)
    await start_workload(agent, dirty_mib=32)
    dest = await qemus.incoming(definition)
    # 6 MiB/s cannot keep up with the rewrite loop; the ceiling is the start value
    policy = ConvergencePolicy(bandwidth_bytes_per_s=6 << 20, stall_passes=1,
                               downtime_ceiling_ms=100, postcopy=True,
                               completion_timeout_s=120)
    uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy)
    resumed: list[bool] = []

    async def switch() -> None:        # the caller's ownership switch goes here
        await resume_incoming(dest, postcopy=True)
        resumed.append(True)

    result = await migrate_out(source, uri, policy, on_postcopy=switch)
    assert result.postcopy and resumed == [True]
    await source.quit()
    await source.wait_exited()
    await reset_migration_settings(dest)
    dest_agent = GuestAgent(dest.paths.qga_socket)
    before = await counter(dest_agent)
    await wait_until(lambda: _counter_above(dest_agent, before), 10, "the counter")
    out = await sh(dest_agent, "n=0; while [ $n -lt 8 ]; do cat /tmp/src; n=$((n+1)); done"
                               " | md5sum; md5sum < /tmp/dirty")
    first, second = (line.split()[0] for line in out.splitlines())
    assert first == second, "the rewritten memory must be intact after post-copy"


async def _counter_above(agent: GuestAgent, value: int) -> bool:
    return await counter(agent) > value


async def test_shared_nothing_over_tls(tiny_image, qemus: QemuSet) -> None:
    work = short_state_dir("pvst-")
    qemus.dirs.append(work)
    tls = write_tls_dir(work / "tls", make_ca(work / "ca", "soak"), hosts=(HOST,))
    src_img, dst_img = work / "src.qcow2", work / "dst.qcow2"
    create_image(src_img, "qcow2", 32 << 20)
    create_image(dst_img, "qcow2", 32 << 20)
    definition = tiny_definition(tiny_image, disks=(
        {"id": "data", "path": str(src_img), "format": "qcow2"},))
    source, agent = await qemus.boot(definition)
    await sh(agent, "dd if=/dev/urandom of=/dev/vda bs=1M count=8 2>/dev/null && sync"
                    " && dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum > /tmp/sum")
    dest = await qemus.incoming(definition.model_copy(update={"disks": (
        definition.disks[0].model_copy(update={"path": str(dst_img)}),)}))
    policy = ConvergencePolicy()
    nodes = mirrored_nodes(definition)
    uri = await prepare_incoming(dest, HOST, free_port(HOST), policy=policy,
                                 tls_creds_dir=tls)
    nbd = await export_disks(dest, HOST, free_port(HOST), nodes, tls_creds_dir=tls)
    await mirror_disks(source, nbd, nodes, tls_creds_dir=tls)
    await migrate_out(source, uri, policy, mirroring=True, tls_creds_dir=tls)
    await stop_export(dest)
    await resume_incoming(dest)
    await source.quit()
    await source.wait_exited()
    dest_agent = GuestAgent(dest.paths.qga_socket)
    out = await sh(dest_agent, "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1M"
                               " count=8 2>/dev/null | md5sum; cat /tmp/sum")
    first, second = (line.split()[0] for line in out.splitlines())
    assert first == second
