"""Small facts about processes from /proc, shared by the cluster agent, the lab and tests.

Zombies count as dead: a process that has exited but was not reaped yet (PID 1 in some
containers never reaps orphans) holds no resources that matter here.
"""

from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
