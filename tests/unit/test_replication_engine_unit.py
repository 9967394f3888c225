"""Pure parts of the replication engine and the replica target: stall detection from
TCP_INFO times, bitmap rotation, bitmap generations, progress, the daemon's argv and
bad input (clear errors, nothing created)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput
from parvisor.replication.engine import (TCPI_LAST_DATA_RECV, TCPI_LAST_DATA_SENT,
                                         BitmapRotation, ConsistentPoint, StallWatch,
                                         async_generations, check_stall_limit,
                                         job_progress, parse_nbd_uri, rotation_period,
                                         tcp_info_times)
from parvisor.replication.target import (TargetSpec, create_replica_image, daemon_argv,
                                         flush_argv)


# --- stall detection --------------------------------------------------------------------
def test_idle_link_is_not_stalled_however_long_it_is_quiet() -> None:
    watch = StallWatch()
    # last data came from the replica (its reply): nothing is out
    assert watch.observe(1000.0, sent_ago_s=600.0, recv_ago_s=599.9) == 0.0


def test_a_request_after_a_long_idle_time_is_timed_from_when_it_was_sent() -> None:
    watch = StallWatch()
    assert watch.observe(100.0, sent_ago_s=300.0, recv_ago_s=299.0) == 0.0
    # a request went out after that poll, no reply yet: stalled since the poll (the
    # earliest it can have been sent), not since the last reply 5 minutes ago
    stalled = watch.observe(100.1, sent_ago_s=0.05, recv_ago_s=299.1)
    assert stalled == pytest.approx(0.1)
    assert watch.observe(103.1, sent_ago_s=3.05, recv_ago_s=302.1) == pytest.approx(3.1)


def test_stall_is_never_reported_late_on_the_first_poll() -> None:
    watch = StallWatch()
    # first poll ever sees a request out for 2 s: taken as 2 s (from the send)
    assert watch.observe(50.0, sent_ago_s=2.0, recv_ago_s=10.0) == pytest.approx(2.0)


def test_replies_restart_the_stall_clock() -> None:
    watch = StallWatch()
    watch.observe(10.0, sent_ago_s=0.0, recv_ago_s=1.0)
    assert watch.observe(12.0, sent_ago_s=0.0, recv_ago_s=3.0) == pytest.approx(2.0)
    # a reply arrived at 11.9 and requests are still out: counted from that reply
    assert watch.observe(12.1, sent_ago_s=0.0, recv_ago_s=0.2) == pytest.approx(0.2)
    assert watch.observe(12.2, sent_ago_s=0.1, recv_ago_s=0.1) == 0.0    # answered


def test_tcp_info_times_are_read_in_seconds() -> None:
    info = bytearray(104)
    struct.pack_into("I", info, TCPI_LAST_DATA_SENT, 1500)
    struct.pack_into("I", info, TCPI_LAST_DATA_RECV, 250)
    assert tcp_info_times(bytes(info)) == (1.5, 0.25)


# --- bitmap rotation --------------------------------------------------------------------
def test_rotation_waits_a_full_period_in_sync_and_alternates() -> None:
    rotation = BitmapRotation(period_s=30.0)
    assert rotation.due(100.0, in_sync_since=None) is None      # not in sync: never
    assert rotation.due(129.0, in_sync_since=100.0) is None
    first = rotation.due(130.0, in_sync_since=100.0)
    assert first is not None
    rotation.mark(first, 130.0)
    assert rotation.due(140.0, in_sync_since=100.0) is None     # other kept >= period
    second = rotation.due(160.0, in_sync_since=100.0)
    assert second is not None and second != first


def test_rotation_period_exceeds_the_stall_limit() -> None:
    assert rotation_period(5.0) >= 4 * 5.0
    assert rotation_period(60.0) == 240.0


# --- async generations, progress, input -------------------------------------------------
def test_async_generations_ignore_other_bitmaps() -> None:
    assert async_generations(["repl-async-3", "repl-a", "repl-async-1", "repl-async-x",
                              "backup"]) == [1, 3]


def test_progress_in_sync_is_never_behind() -> None:
    point = ConsistentPoint(1.0, 2.0)
    syncing = job_progress("initial-sync", {"len": 100, "offset": 40}, consistent=None)
    assert (syncing.bytes_total, syncing.bytes_done, syncing.bytes_behind) == (100, 40, 60)
    in_sync = job_progress("in-sync", {"len": 120, "offset": 100}, consistent=point)
    assert in_sync.bytes_behind == 0 and in_sync.last_consistent_at == point
    assert job_progress("broken", None, consistent=None, error="x").bytes_total == 0


@pytest.mark.parametrize("uri", ["tcp:1.2.3.4:5", "nbd://host", "nbd://:10809", "x"])
def test_bad_nbd_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidInput):
        parse_nbd_uri(uri)


def test_nbd_uri_parts() -> None:
    assert parse_nbd_uri("nbd://10.0.0.2:10809") == ("10.0.0.2", 10809)
    assert parse_nbd_uri("nbd://[fd00::2]:10809") == ("fd00::2", 10809)


@pytest.mark.parametrize("limit", [0, 0.1, -1, 301])
def test_stall_limit_out_of_range_is_refused(limit: float) -> None:
    with pytest.raises(InvalidInput):
        check_stall_limit(limit)


# --- the replica target -----------------------------------------------------------------
def test_daemon_argv_names_formats_and_escapes_commas(tmp_path: Path) -> None:
    spec = TargetSpec(image=tmp_path / "a,b.qcow2", format="qcow2", listen_host="10.0.0.2",
                      port=10809, state_dir=tmp_path, tls_dir=tmp_path / "tls",
                      netns="pvrx")
    argv = daemon_argv(spec, tmp_path / "q.sock", tmp_path / "p.pid")
    joined = " ".join(argv)
    assert argv[:4] == ["ip", "netns", "exec", "pvrx"]
    assert "filename=" + str(tmp_path / "a,,b.qcow2") in joined
    assert "driver=qcow2" in joined
    assert "tls-creds-x509,id=replica-tls" in joined and "verify-peer=on" in joined
    assert "tls-creds=replica-tls" in joined and "addr.port=10809" in joined


def test_bad_target_specs_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "r.qcow2"
    image.write_bytes(b"")
    good = dict(image=image, format="qcow2", listen_host="127.0.0.1", port=10809,
                state_dir=tmp_path)
    TargetSpec(**good).validate()
    for bad in ({"format": "vmdk"}, {"port": 0}, {"image": tmp_path / "missing"},
                {"tls_dir": tmp_path}):
        with pytest.raises(InvalidInput):
            TargetSpec(**{**good, **bad}).validate()


def test_replica_image_bad_input_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        create_replica_image(tmp_path / "x.vmdk", "vmdk", 1 << 20)
    with pytest.raises(InvalidInput):
        create_replica_image(tmp_path / "x.qcow2", "qcow2", 0)
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "e.qcow2"
    existing.write_bytes(b"keep")
    with pytest.raises(InvalidInput):
        create_replica_image(existing, "qcow2", 1 << 20)
    assert existing.read_bytes() == b"keep"


def test_flush_client_uses_the_targets_address_and_certificates(tmp_path: Path) -> None:
    spec = TargetSpec(image=tmp_path / "r.qcow2", format="qcow2", listen_host="10.0.0.2",
                      port=10809, state_dir=tmp_path, tls_dir=tmp_path / "tls",
                      netns="pvrx")
    argv = flush_argv(spec)
    joined = " ".join(argv)
    assert argv[:5] == ["ip", "netns", "exec", "pvrx", "qemu-io"]
    assert argv[-2:] == ["-c", "flush"]
    assert "endpoint=client" in joined and "file.tls-creds=flush-tls" in joined
    assert "file.server.host=10.0.0.2" in joined and "file.export=disk" in joined
