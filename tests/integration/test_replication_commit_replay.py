"""An async replica whose host lost power while committing a complete cycle finishes
that commit at its next start (real qemu-storage-daemon, qemu-io over NBD; no guest).

The cycle's overlay holds the whole cycle (written through, flushed per write); the
coordinator marks the commit durably before it starts and clears the mark after the
image is flushed. Here the daemon is SIGKILLed with the cycle shipped but not folded in:
the image must not have the cycle yet (the check that the test can fail), and after the
replay it must, with the overlay and the mark gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from parvisor.migration.engine import free_port
from parvisor.replication.coordinator import ReplicationCoordinator, write_durably
from parvisor.replication.protocol import Mode, ReplicationRecord, State
from parvisor.replication.target import ReplicaTarget, TargetSpec, create_replica_image
from parvisor.store.etcd import Keys

pytestmark = pytest.mark.qemu
HOST = "127.0.0.1"
VM = "0f0f0f0f-0000-4000-8000-000000000001"


def has_pattern(image: Path, byte: int) -> bool:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c",
                           f"read -P {byte:#x} 0 1M", str(image)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def test_a_commit_cut_by_power_loss_is_finished_at_the_next_start(tmp_path):
    root = tmp_path / "replicas"
    image = root / VM / "disk0.qcow2"
    image.parent.mkdir(parents=True)
    create_replica_image(image, "qcow2", 8 << 20)
    coordinator = ReplicationCoordinator(
        SimpleNamespace(store=SimpleNamespace(kv=None, keys=Keys("/t/")),
                        config=SimpleNamespace(state_dir=tmp_path)), "h2",
        address=HOST, root=root, tls_dir=None)
    record = ReplicationRecord(VM, "web", Mode.ASYNC, "h1", "h2", state=State.IN_SYNC,
                               interval_s=30, images={"h1": {"disk0": "/elsewhere"},
                                                      "h2": {"disk0": str(image)}})

    async def scenario() -> None:
        port = free_port(HOST)
        target = await ReplicaTarget.start(TargetSpec(
            image=image, format="qcow2", listen_host=HOST, port=port,
            state_dir=root / VM / "qsd-disk0", socket_dir=tmp_path / "run"))
        try:
            await target.begin_cycle()
            shipped = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M",
                 f"nbd://{HOST}:{port}/disk"], capture_output=True, text=True, timeout=60)
            assert shipped.returncode == 0, shipped.stderr
            write_durably(coordinator._commit_marker(VM), json.dumps({"cycle": 7}))
            os.kill(target.pid, signal.SIGKILL)        # the power loss, before the fold
        finally:
            await target.stop()
        assert not has_pattern(image, 0xab)            # the image lacks the cycle
        await coordinator._replay_interrupted_commit(record)

    asyncio.run(scenario())
    assert has_pattern(image, 0xab)
    assert not coordinator._commit_marker(VM).exists()
    assert not (root / VM / "qsd-disk0" / "cycle.qcow2").exists()
