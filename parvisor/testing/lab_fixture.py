"""A real cluster lab for tests: ``parvisor lab up`` through the CLI in a unique lab
dir, helpers to run commands inside hosts, to watch QEMUs per host and to run the INV-1
canary in a guest (``parvisor.testing.canary``), and a teardown (``lab down``) that
proves nothing is left: no namespace, link, mount, or live process.

Never: sleep blindly; every wait polls a condition with a timeout. INV-1 is checked at
every poll of ``wait_vm``: a VM's live QEMU may exist on at most one host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from parvisor.lab import mounts, net
from parvisor.lab.lab import Lab
from parvisor.testing import canary
from parvisor.testing.host_fixture import PARVISOR


@contextlib.contextmanager
def running_lab(hosts: int = 3, *extra: str) -> Iterator["LabUnderTest"]:
    """A lab for a test module: its service logs are printed when a test fails, and
    ``down`` (which proves nothing is left) runs whatever happens."""
    lab = LabUnderTest(hosts, *extra)
    try:
        yield lab
    except BaseException:
        print(lab.logs())
        raise
    finally:
        lab.down()


class LabUnderTest:
    def __init__(self, hosts: int = 3, *extra: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pvl-", dir="/tmp"))
        self.env = {**os.environ, "PARVISOR_LAB_DIR": str(self.dir)}
        self.lab = Lab(self.dir)
        self.double_runs: list[str] = []
        self._canary_disks: dict[str, tuple[Path, str]] = {}
        self.cli("lab", "up", "--hosts", str(hosts), *extra, timeout=120)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([PARVISOR, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"parvisor {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def on(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("lab", "exec", host, "--", "parvisor", *args, check=check)

    def sh(self, host: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        """A shell command inside a lab host (its namespaces, not a guest)."""
        return self.cli("lab", "exec", host, "--", "sh", "-c", script, check=check)

    def start_canary(self, host: str, vm: str) -> None:
        """The INV-1 canary in VM ``vm`` (running on ``host``), logging ``host``."""
        self.on(host, "vm", "exec", vm, "--", *canary.start_argv(host))

    def canary_log(self, vm: str, asking: str = "h2") -> canary.Verdict:
        """The canary log of ``vm``'s first disk, read from shared storage on the root
        side (any host's CLI says where the disk is, asked once: it stays put)."""
        if vm not in self._canary_disks:
            disk = json.loads(self.on(asking, "vm", "show", vm, "--json").stdout)["disks"][0]
            self._canary_disks[vm] = (Path(disk["path"]), disk["format"])
        return canary.verdict_of(*self._canary_disks[vm])

    def vms(self, host: str) -> list[dict[str, Any]]:
        return json.loads(self.on(host, "vm", "list", "--json").stdout)

    def vm_uuid(self, host: str, name: str) -> str:
        return json.loads(self.on(host, "vm", "show", name, "--json").stdout)["uuid"]

    def running_on(self, vm_uuid: str) -> list[str]:
        """Hosts with a live QEMU of this VM (pidfile in the host's state dir)."""
        hosts = []
        for name, node in self.lab.state().nodes.items():
            if node.runs_vms and any(_runs_vm(pid, vm_uuid)
                                     for pid in self.lab.qemu_pids(name)):
                hosts.append(name)
        if len(hosts) > 1:
            self.double_runs.append(f"{vm_uuid} on {hosts}")
        return hosts

    def wait(self, condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            assert not self.double_runs, f"INV-1 violated: {self.double_runs}"
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.dir.glob("*/service.log")))

    def down(self) -> None:
        state = self.lab.state()
        pids = [pid for node in state.nodes.values() for pid in node.pids.values()]
        pids += [pid for node in state.nodes.values() for pid in net.netns_pids(node.ns)]
        names = [node.ns for node in state.nodes.values()]
        keep = Path("/tmp/parvisor-lab-last-logs")     # for a failed run's post-mortem
        shutil.rmtree(keep, ignore_errors=True)
        for log in self.dir.glob("*/*.log"):
            (keep / log.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep / log.parent.name / log.name)
        self.cli("lab", "down")
        assert not [pid for pid in pids if net.pid_alive(pid)], "lab processes survived"
        assert not [ns for ns in names if (net.NETNS_DIR / ns).exists()], "netns left"
        links = net.ip("-o", "link", "show", check=False).stdout
        assert state.prefix not in links, "links left behind"
        mountinfo = Path("/proc/self/mountinfo").read_text()
        assert not mounts.mounts_under(mountinfo, self.dir.resolve()), \
            "mounts left behind"
        assert not self.dir.exists(), "lab dir left behind"


def _runs_vm(pid: int, vm_uuid: str) -> bool:
    """A QEMU of this VM: ``-uuid <vm_uuid>`` on its command line (a path with the
    uuid in it, e.g. a test-failover copy's disk, does not count)."""
    args = _cmdline(pid).split()
    return any(a == "-uuid" and b == vm_uuid for a, b in zip(args, args[1:]))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
