"""Helpers for tests that boot real QEMU guests (the tiny image) or bare QEMUs.

``tiny_image_for_tests`` builds the tiny guest image once into a directory shared by
all test runs (``$PARVISOR_TEST_IMAGE_DIR``, default ``/var/tmp/parvisor-test-image``);
the image module's own lock makes concurrent builds wait for each other.

``short_state_dir`` gives a state dir short enough for unix socket paths (108 bytes)
whatever pytest's tmp_path looks like. ``wait_until`` polls a condition with a
deadline (tests never sleep blindly).

Nothing here may kill processes by name: tests stop the QEMUs they started by PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

from parvisor.procfs import pid_alive  # noqa: F401  (tests import it from here)
from parvisor.image.tiny import TinyImage, build_tiny_image, load_tiny_image

DEFAULT_TEST_IMAGE_DIR = "/var/tmp/parvisor-test-image"
T = TypeVar("T")


def test_image_dir() -> Path:
    return Path(os.environ.get("PARVISOR_TEST_IMAGE_DIR", DEFAULT_TEST_IMAGE_DIR))


test_image_dir.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


def tiny_image_for_tests() -> TinyImage:
    """The tiny image, built on first use and reused by every later test run."""
    state_dir = test_image_dir()
    image = load_tiny_image(state_dir)
    if image is not None:
        return image
    return build_tiny_image(state_dir)


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


def short_state_dir(prefix: str = "pv-") -> Path:
    """A fresh state dir under /tmp; VmPaths sockets below it stay under 108 bytes.

    The caller removes it (``shutil.rmtree``) in teardown.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


async def wait_until(condition: Callable[[], T | Awaitable[T]], timeout: float, what: str,
                     interval: float = 0.05) -> T:
    """Poll ``condition`` (sync or async) until it is truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
