"""The INV-1 canary: a guest that logs "I run on host X" to its shared disk, and a
checker that finds two hosts' copies interleaved in that log.

What for: issue 5's real-lab tests check INV-1 (a VM runs on at most one host) from
outside (live QEMUs per host); the canary checks it from the disk's point of view,
which is what INV-1 protects. A copy of the VM that kept running on a fenced-too-late
host would keep writing its own host name between the new copy's records.

The guest side (``SCRIPT``, busybox ash, started through ``vm exec`` and detached with
``setsid`` so exec returns) writes fixed-size records ``canary <host> <counter>`` to the
raw disk: one 512-byte sector per record with O_DIRECT and fsync (no page-cache
read-modify-write of a neighbour's record, each record on the host's file before the
next). At start it scans for the first empty slot, so a guest restarted elsewhere
continues after the last record; the counter is that slot number.

The root side (``read_log``) reads the disk image from shared storage (qcow2 through
``qemu-img convert -U`` to raw, a raw image directly) and ``check`` asserts, a pure
function: records are contiguous, host labels never return to an earlier host
(h1 h1 h3 h3 ok, h1 h3 h1 not) and each host's counters only grow.

Never: read the log through the guest (its page cache is the thing under test).
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SLOT = 512                    # bytes per record: one sector, written with O_DIRECT
MAX_SLOTS = 4096              # 2 MiB of log: hours at the canary's rate
MAGIC = b"canary "
INTERVAL_US = 200_000         # one record per 0.2 s (+ the dd's own time under TCG)

# $1 = host label, $2 = block device. The scan reads MAX_SLOTS sectors at once
# (O_DIRECT: never from a stale cache) and counts the records: they are contiguous.
SCRIPT = f"""host=$1; dev=$2
next=$(dd if=$dev bs=65536 count={MAX_SLOTS * SLOT // 65536} iflag=direct 2>/dev/null \\
       | tr -d '\\000' | grep -c '^canary ')
while [ "$next" -lt {MAX_SLOTS} ]; do
  printf '%-{SLOT - 1}s\\n' "canary $host $next" \\
    | dd of=$dev bs={SLOT} seek=$next count=1 iflag=fullblock oflag=direct \\
         conv=notrunc,fsync 2>/dev/null || exit 1
  next=$((next + 1))
  usleep {INTERVAL_US}
done
"""


def start_argv(host: str, device: str = "/dev/vda") -> list[str]:
    """What ``vm exec NAME -- …`` runs to start the canary, detached from exec."""
    inner = f"setsid sh -c {shlex.quote(SCRIPT)} canary {shlex.quote(host)} " \
            f"{shlex.quote(device)} </dev/null >/dev/null 2>&1 &"
    return ["sh", "-c", inner]


@dataclass(frozen=True)
class Record:
    slot: int
    host: str
    counter: int


@dataclass(frozen=True)
class Verdict:
    records: list[Record]
    runs: list[tuple[str, int]]       # (host, records) per run of one host, in order
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, host: str) -> int:
        return sum(1 for record in self.records if record.host == host)


class CanaryViolation(AssertionError):
    pass


def parse(raw: bytes) -> tuple[list[Record], list[str]]:
    """The records of a raw log, and what is malformed in it (garbage, holes)."""
    records, problems, empty_at = [], [], None
    for slot in range(len(raw) // SLOT):
        data = raw[slot * SLOT:(slot + 1) * SLOT]
        if not data.strip(b"\0"):
            empty_at = slot if empty_at is None else empty_at
            continue
        if empty_at is not None:
            problems.append(f"slot {slot}: a record after the empty slot {empty_at}")
            empty_at = None
        fields = data[len(MAGIC):].split() if data.startswith(MAGIC) else []
        if len(fields) != 2 or not fields[1].isdigit():
            problems.append(f"slot {slot}: not a canary record: {data[:40]!r}")
            continue
        records.append(Record(slot, fields[0].decode(errors="replace"), int(fields[1])))
    return records, problems


def check(records: list[Record], problems: list[str] = ()) -> Verdict:
    """INV-1 as the disk saw it: one host's run of records never resumes after another
    host wrote, and each host's counters only grow."""
    problems, runs = list(problems), []
    finished: set[str] = set()
    last_counter: dict[str, int] = {}
    for record in records:
        if runs and runs[-1][0] == record.host:
            runs[-1] = (record.host, runs[-1][1] + 1)
        else:
            if record.host in finished:
                problems.append(f"slot {record.slot}: {record.host} writes again after "
                                f"{runs[-1][0]} took over (two copies interleaved)")
            if runs:
                finished.add(runs[-1][0])
            runs.append((record.host, 1))
        previous = last_counter.get(record.host)
        if previous is not None and record.counter <= previous:
            problems.append(f"slot {record.slot}: {record.host}'s counter "
                            f"{record.counter} after {previous}")
        last_counter[record.host] = record.counter
    return Verdict(list(records), runs, problems)


def assert_no_interleaving(verdict: Verdict) -> None:
    if not verdict.ok:
        raise CanaryViolation("INV-1 canary: " + "; ".join(verdict.problems[:10])
                              + f" (runs: {verdict.runs})")


# --- root side: reading the image --------------------------------------------------
def read_log(image: Path, fmt: str) -> bytes:
    """The first MAX_SLOTS sectors of the disk, as the guest sees them. -U: the VM may
    be running (and holds the image's lock); we only read."""
    if fmt == "raw":
        with open(image, "rb") as handle:
            return handle.read(MAX_SLOTS * SLOT)
    with tempfile.TemporaryDirectory(prefix="pv-canary-") as tmp:
        raw = Path(tmp) / "log.raw"
        done = subprocess.run(["qemu-img", "convert", "-U", "-q", "-f", fmt, "-O", "raw",
                               str(image), str(raw)], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"qemu-img convert {image}: {done.stderr.strip()}")
        with open(raw, "rb") as handle:
            return handle.read(MAX_SLOTS * SLOT)


def verdict_of(image: Path, fmt: str) -> Verdict:
    return check(*parse(read_log(image, fmt)))
