"""The INV-1 canary (parvisor.testing.canary): the checker on hand-made logs, and the
guest script itself run by the host's busybox on a plain file standing in for the disk
(the guest runs the same Debian busybox)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from parvisor.testing import canary


def _log(*entries: tuple[str, int] | None) -> bytes:
    """Slots as the guest writes them; None = an empty (zero) slot."""
    out = b""
    for entry in entries:
        if entry is None:
            out += bytes(canary.SLOT)
        else:
            out += f"canary {entry[0]} {entry[1]}".ljust(canary.SLOT - 1).encode() + b"\n"
    return out + bytes(canary.SLOT * 3)


def _verdict(raw: bytes) -> canary.Verdict:
    return canary.check(*canary.parse(raw))


def test_one_host_handing_over_to_another_is_fine():
    verdict = _verdict(_log(("h1", 0), ("h1", 1), ("h3", 2), ("h3", 3)))
    assert verdict.ok and verdict.runs == [("h1", 2), ("h3", 2)]
    assert verdict.count("h3") == 2
    canary.assert_no_interleaving(verdict)


def test_a_host_writing_again_after_another_took_over_is_a_violation():
    verdict = _verdict(_log(("h1", 0), ("h3", 1), ("h1", 2)))
    assert not verdict.ok and "h1 writes again after h3" in verdict.problems[0]
    with pytest.raises(canary.CanaryViolation, match="two copies interleaved"):
        canary.assert_no_interleaving(verdict)


def test_a_counter_going_back_for_one_host_is_a_violation():
    verdict = _verdict(_log(("h1", 0), ("h1", 2), ("h1", 1)))
    assert verdict.problems == ["slot 2: h1's counter 1 after 2"]


def test_holes_and_garbage_are_reported_and_an_empty_log_is_fine():
    assert _verdict(_log(("h1", 0), None, ("h1", 2))).problems == [
        "slot 2: a record after the empty slot 1"]
    garbage = _log(("h1", 0))[:canary.SLOT] + b"x" * canary.SLOT
    assert "not a canary record" in _verdict(garbage).problems[0]
    empty = _verdict(bytes(canary.SLOT * 8))
    assert empty.ok and empty.records == [] and empty.runs == []


def test_the_start_command_detaches_and_passes_the_host_label():
    argv = canary.start_argv("h2")
    assert argv[:2] == ["sh", "-c"]
    assert argv[2].startswith("setsid sh -c ") and argv[2].endswith(
        " canary h2 /dev/vda </dev/null >/dev/null 2>&1 &")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox-static")
def test_the_guest_script_appends_and_a_restart_continues_after_the_last_record(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(canary.MAX_SLOTS * canary.SLOT))    # a raw image: read directly
    _run_canary(disk, "h1", records_at_least=3)
    first = canary.verdict_of(disk, "raw")
    _run_canary(disk, "h3", records_at_least=first.count("h1") + 2)
    verdict = canary.verdict_of(disk, "raw")
    canary.assert_no_interleaving(verdict)
    assert [host for host, _ in verdict.runs] == ["h1", "h3"]
    assert [r.counter for r in verdict.records] == list(range(len(verdict.records)))


def _run_canary(disk: Path, host: str, records_at_least: int) -> None:
    """The script as the guest runs it, stopped (by its session's PID) once the log holds
    ``records_at_least`` records."""
    proc = subprocess.Popen(["busybox", "sh", "-c", canary.SCRIPT, "canary", host, str(disk)],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(canary.verdict_of(disk, "raw").records) < records_at_least:
            assert proc.poll() is None, f"the canary script exited {proc.returncode}"
            assert time.monotonic() < deadline, "the canary wrote too few records in 20 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
