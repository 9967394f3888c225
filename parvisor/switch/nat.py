"""NAT switches: the masquerading ruleset (nftables) and the DHCP service (dnsmasq).

One NAT switch = one nftables table ``ip parvisor_<bridge>`` + one dnsmasq process.
The table is replaced atomically (``nft -f`` with add+delete+define in one
transaction), so applying it again is harmless. dnsmasq runs as a daemon bound only
to the switch's bridge (``--bind-interfaces --interface=``) with DNS off (``--port=0``);
its pid file, lease file and log live in ``<state>/switches/<name>/``.

This module must never kill a process it cannot prove is its own: a PID is signalled
only when ``/proc/<pid>/cmdline`` is dnsmasq *and* names this switch's pid file (PIDs
are reused after a reboot). It never kills by name, never touches other nft tables,
and never turns ``ip_forward`` off again (other software may rely on it).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from parvisor.errors import Failed

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
LEASE_TIME = "1h"
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NatPlan:
    """Everything the NAT service needs for one switch (built by the manager)."""

    switch: str
    bridge: str
    table: str
    subnet: str            # e.g. 10.213.7.0/24
    gateway: str           # the host's address on the bridge, e.g. 10.213.7.1
    dhcp_start: str
    dhcp_end: str
    state_dir: Path        # <state>/switches/<name>

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def lease_file(self) -> Path:
        return self.state_dir / "dnsmasq.leases"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dnsmasq.log"


def dhcp_range(subnet: str) -> tuple[str, str]:
    """The host takes the first address; DHCP hands out the second to the last."""
    net = ipaddress.IPv4Network(subnet)
    return str(net.network_address + 2), str(net.broadcast_address - 1)


def nft_ruleset(plan: NatPlan) -> str:
    """The whole table; ``add`` then ``delete`` first makes the load a replacement."""
    return f"""add table ip {plan.table}
delete table ip {plan.table}
table ip {plan.table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {plan.subnet} ip daddr != {plan.subnet} masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{plan.bridge}" accept
        oifname "{plan.bridge}" ct state established,related accept
    }}
}}
"""


def dnsmasq_argv(plan: NatPlan, binary: str = "dnsmasq") -> list[str]:
    mask = str(ipaddress.IPv4Network(plan.subnet).netmask)
    return [binary, "--conf-file=/dev/null", "--port=0", "--bind-interfaces",
            f"--interface={plan.bridge}", "--except-interface=lo",
            f"--listen-address={plan.gateway}",
            f"--pid-file={plan.pid_file}", f"--dhcp-leasefile={plan.lease_file}",
            f"--log-facility={plan.log_file}",
            f"--dhcp-range={plan.dhcp_start},{plan.dhcp_end},{mask},{LEASE_TIME}",
            f"--dhcp-option=option:router,{plan.gateway}",
            "--dhcp-authoritative"]


class NatBackend(Protocol):
    def ensure(self, plan: NatPlan, *, restart_dhcp: bool = False) -> None: ...
    def remove(self, plan: NatPlan) -> None: ...
    def dhcp_pid(self, plan: NatPlan) -> int | None: ...
    def table_exists(self, table: str) -> bool: ...


class NatService:
    """The real backend: runs ``nft`` and ``dnsmasq``."""

    def __init__(self, *, nft: str = "nft", dnsmasq: str = "dnsmasq") -> None:
        self.nft, self.dnsmasq = nft, dnsmasq

    def ensure(self, plan: NatPlan, *, restart_dhcp: bool = False) -> None:
        enable_ip_forward()
        self._nft(["-f", "-"], stdin=nft_ruleset(plan))
        if restart_dhcp:
            self._stop_dhcp(plan)
        if self.dhcp_pid(plan) is None:
            self._start_dhcp(plan)

    def remove(self, plan: NatPlan) -> None:
        self._stop_dhcp(plan)
        if self.table_exists(plan.table):
            self._nft(["delete", "table", "ip", plan.table])

    def table_exists(self, table: str) -> bool:
        result = subprocess.run([self.nft, "list", "table", "ip", table],
                                capture_output=True, text=True)
        return result.returncode == 0

    def _nft(self, args: list[str], stdin: str | None = None) -> None:
        try:
            result = subprocess.run([self.nft, *args], input=stdin, capture_output=True,
                                    text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Failed(f"nft {' '.join(args)} could not run: {exc}") from exc
        if result.returncode != 0:
            raise Failed(f"nft {' '.join(args)} failed: {result.stderr.strip()}",
                         stdin=stdin)

    # --- dnsmasq ----------------------------------------------------------------------
    def dhcp_pid(self, plan: NatPlan) -> int | None:
        """The PID of *this switch's* running dnsmasq, or None."""
        try:
            pid = int(plan.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_our_dnsmasq(pid, plan.pid_file) else None

    def _start_dhcp(self, plan: NatPlan) -> None:
        plan.state_dir.mkdir(parents=True, exist_ok=True)
        plan.pid_file.unlink(missing_ok=True)
        argv = dnsmasq_argv(plan, self.dnsmasq)
        # dnsmasq daemonizes; the parent returns only after the child reported whether
        # it could bind, so a bad start shows here with its message.
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Failed(f"dnsmasq for switch '{plan.switch}' could not run: {exc}") from exc
        if result.returncode != 0 or self._wait_pid(plan) is None:
            raise Failed(f"dnsmasq for switch '{plan.switch}' did not start:"
                         f" {(result.stderr or result.stdout).strip()}", argv=argv)

    def _wait_pid(self, plan: NatPlan, timeout: float = 5.0) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.dhcp_pid(plan)
            if pid is not None:
                return pid
            time.sleep(0.05)
        return None

    def _stop_dhcp(self, plan: NatPlan) -> None:
        pid = self.dhcp_pid(plan)
        if pid is not None:
            _terminate(pid, plan.pid_file)
        plan.pid_file.unlink(missing_ok=True)


def enable_ip_forward(path: Path = IP_FORWARD) -> None:
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
    except OSError as exc:
        raise Failed(f"cannot enable IPv4 forwarding ({path}): {exc}") from exc


def _is_our_dnsmasq(pid: int, pid_file: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not args or not os.path.basename(args[0].decode(errors="replace")) == "dnsmasq":
        return False
    return f"--pid-file={pid_file}".encode() in args


def _terminate(pid: int, pid_file: Path) -> None:
    """SIGTERM, wait, then SIGKILL: only while the PID is still provably ours."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        if not _is_our_dnsmasq(pid, pid_file):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _is_our_dnsmasq(pid, pid_file):
                return
            time.sleep(0.05)
    raise Failed(f"dnsmasq (pid {pid}) did not exit", pid=pid)


class FakeNat:
    """In-memory ``NatBackend`` for unit tests: records calls, runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.tables: set[str] = set()
        self.pids: dict[str, int] = {}

    def ensure(self, plan: NatPlan, *, restart_dhcp: bool = False) -> None:
        self.calls.append(("ensure", plan.switch, restart_dhcp))
        self.tables.add(plan.table)
        self.pids.setdefault(plan.switch, 4242)

    def remove(self, plan: NatPlan) -> None:
        self.calls.append(("remove", plan.switch, False))
        self.tables.discard(plan.table)
        self.pids.pop(plan.switch, None)

    def dhcp_pid(self, plan: NatPlan) -> int | None:
        return self.pids.get(plan.switch)

    def table_exists(self, table: str) -> bool:
        return table in self.tables
