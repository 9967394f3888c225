"""Injected crash points for crash-consistency tests.

``crashpoint("create.before_commit")`` kills the current process with SIGKILL when the
environment variable ``PARVISOR_CRASH_AT`` names that point. Costs one dict lookup when
unset; production code calls it at every place where a crash would be interesting.
"""

from __future__ import annotations

import os
import signal


def crashpoint(name: str) -> None:
    if os.environ.get("PARVISOR_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
