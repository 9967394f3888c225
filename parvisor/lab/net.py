"""Network namespaces, veth pairs and a bridge for the lab, and finding a namespace's
processes by PID.

What for: ``parvisor.lab.lab`` builds and removes the lab's network with these. Every
name carries the lab's unique prefix; removal deletes exactly the names recorded.

Never: touch a namespace or link without the lab prefix, or find processes by name
(a namespace's processes are the PIDs whose ``/proc/PID/ns/net`` is that namespace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from parvisor.errors import Failed
from parvisor.procfs import pid_alive  # lab.py uses it as net.pid_alive

NETNS_DIR = Path("/run/netns")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise Failed(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def make_bridge(name: str, address: str) -> None:
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", address, "dev", name)
    ip("link", "set", name, "up")


def make_node(ns: str, root_link: str, bridge: str, address: str) -> None:
    """Namespace ``ns`` with eth0 = one end of a veth whose other end is on the bridge."""
    ip("netns", "add", ns)
    peer = f"{root_link}p"
    ip("link", "add", root_link, "type", "veth", "peer", "name", peer)
    ip("link", "set", peer, "netns", ns)
    ip("-n", ns, "link", "set", peer, "name", "eth0")
    ip("-n", ns, "addr", "add", address, "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("link", "set", root_link, "master", bridge, "up")


def set_link(root_link: str, up: bool) -> None:
    ip("link", "set", root_link, "up" if up else "down")


def link_up(root_link: str) -> bool:
    done = ip("-o", "link", "show", root_link, check=False)
    if done.returncode != 0 or "<" not in done.stdout:
        return False
    return "UP" in done.stdout.split("<", 1)[1].split(">", 1)[0].split(",")


def remove(ns_names: list[str], links: list[str], bridge: str | None) -> list[str]:
    """Delete what exists of these names; return what could not be deleted."""
    left = []
    for link in links:
        if ip("link", "show", link, check=False).returncode == 0:
            if ip("link", "del", link, check=False).returncode != 0:
                left.append(link)
    for ns in ns_names:
        if (NETNS_DIR / ns).exists() and ip("netns", "del", ns, check=False).returncode != 0:
            left.append(ns)
    if bridge and ip("link", "show", bridge, check=False).returncode == 0:
        if ip("link", "del", bridge, check=False).returncode != 0:
            left.append(bridge)
    return left


def netns_pids(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns`` (compared by nsfs inode)."""
    try:
        inode = os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino == inode:
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def kill_pids(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL each PID; wait until they are gone; return survivors."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if pid_alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if pid_alive(pid)]
