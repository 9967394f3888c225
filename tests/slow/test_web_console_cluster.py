"""Slow tier: the web console's cluster page against a real 2-host lab, in Debian's
chromium driven by Playwright.

How the browser reaches the console: the lab host's service listens on *its own*
loopback (``console_listen = "127.0.0.1:PORT"``, plain HTTP, as a loopback console may)
and chromium runs inside that host's namespaces: Playwright launches a small wrapper
that ``exec``s chromium through the lab's ``exec_argv`` (nsenter + ``ip netns exec``
replace themselves, so Playwright's pipe to the browser is kept). No TLS and no
routing from the root namespace are needed, and the page sees exactly what an
administrator on that host sees. (Configuring TLS with the lab's PKI would test the
same page plus certificates, which tests/unit/test_web_auth.py and the console's
listener checks cover.)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect  # noqa: E402

from parvisor.testing.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402
from parvisor.testing.host_fixture import wait_for  # noqa: E402
from parvisor.testing.lab_fixture import running_lab  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd-server")]
TOKEN = "lab-console-token-0123456789"



def _serve_console(lab, host: str, port: int) -> None:
    """Console on the host's loopback; the service restarts to read its config (the
    top of config.toml: below is the [cluster] table)."""
    config = lab.lab.state_dir(host) / "config.toml"
    config.write_text(f'console_listen = "127.0.0.1:{port}"\napi_tokens = ["{TOKEN}"]\n'
                      + config.read_text())
    lab.lab.crash_service(host)
    lab.lab.start_service(host)
    # answers on the console port from inside the host (its loopback)
    probe = (f"import urllib.request as u; print(u.urlopen(u.Request("
             f"'http://127.0.0.1:{port}/v1/cluster', headers={{'authorization': "
             f"'Bearer {TOKEN}'}})).status)")
    lab.wait(lambda: lab.cli("lab", "exec", host, "--", sys.executable, "-c", probe,
                             check=False).stdout.strip() == "200", 60,
             f"{host}'s console to answer")


def _chromium_inside(lab, host: str, directory: Path) -> Path:
    argv, _env = lab.lab.exec_argv(host, [CHROMIUM])
    wrapper = directory / f"chromium-in-{host}"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(map(shlex.quote, argv)) + ' "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_cluster_page_on_a_two_host_lab(tiny_image, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (./setup.sh install)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with running_lab(2) as lab:
        _serve_console(lab, "h1", port)
        lab.on("h1", "vm", "create", "cv1", "--image", "tiny")
        with playwright_sync.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(_chromium_inside(lab, "h1", tmp_path)), args=CHROMIUM_ARGS)
            # a service restart and TCG guests on 2 busy cores: pages may take more than
            # expect's default 5 s to show a condition (waits, not deadlines)
            expect.set_options(timeout=30_000)
            try:
                _check_pages(lab, browser, port)
            finally:
                expect.set_options(timeout=5_000)
                browser.close()


def _check_pages(lab, browser, port: int) -> None:
    context = browser.new_context(base_url=f"http://127.0.0.1:{port}",
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto("/ui/cluster")
    page.wait_for_url("**/ui/login?next=**")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("#who")).to_contain_text("administrator")

    for host in ("h1", "h2"):
        row = page.locator(f"tr[data-host={host}]")
        expect(row.locator("[data-health]")).to_have_attribute("data-health", "up")
        expect(row).to_contain_text(" s of ")          # lease age of the TTL
    expect(page.locator("dd[data-field=quorum]")).to_have_text("yes")
    manager = json.loads(lab.on("h1", "cluster", "status", "--json").stdout)["manager"]
    expect(page.locator("dd[data-field=manager]")).to_have_text(manager)
    expect(page.locator(f"tr[data-host={manager}]")).to_contain_text("manager")
    expect(page.locator("dd[data-field='voting members']")).to_contain_text("reachable")
    page.screenshot(path=str(ARTIFACTS / "cluster.png"), full_page=True)

    # drain h2 (confirmed), then resume it; the page follows on its own
    row = page.locator("tr[data-host=h2]")
    row.locator("button[data-action=drain-host]").click()
    row.locator("button[data-action=confirm-drain-host]").click()
    expect(row.locator("[data-health]")).to_have_attribute("data-health", "maintenance")
    assert _health(lab, "h2") == "maintenance"
    row.locator("button[data-action=resume-host]").click()
    expect(row.locator("[data-health]")).to_have_attribute("data-health", "up")
    wait_for(lambda: _health(lab, "h2") == "up", 30, "h2 back from maintenance")

    # a cluster member's VM page offers migration to the other host
    page.goto("/ui/vms/cv1")
    expect(page.locator("#f-to option[value=h2]")).to_have_count(1)
    expect(page.locator("#migration")).to_contain_text("No migration on record")
    page.screenshot(path=str(ARTIFACTS / "vm-cluster.png"), full_page=True)

    # live migration from the page: progress shown until it completes, VM then on h2
    lab.on("h1", "vm", "start", "cv1")
    expect(page.locator("#vm-state [data-state]")).to_have_attribute("data-state", "running")
    page.select_option("#f-to", "h2")
    page.click("button[data-action=migrate]")
    expect(page.locator("#migration [data-state]")).to_have_attribute(
        "data-state", "completed", timeout=180_000)
    expect(page.locator("#migration-progress")).to_have_attribute("value", "1")
    page.screenshot(path=str(ARTIFACTS / "vm-migrated.png"), full_page=True)
    assert json.loads(lab.on("h1", "vm", "show", "cv1", "--json").stdout)["host"] == "h2"
    page.goto("/ui/")                     # h1's VM list names the host the VM runs on
    expect(page.locator("tr[data-vm=cv1] td.host")).to_have_text("h2")
    lab.on("h2", "vm", "turn-off", "cv1")
    context.close()


def _health(lab, host: str) -> str:
    status = json.loads(lab.on("h1", "cluster", "status", "--json").stdout)
    return next(h["health"] for h in status["hosts"] if h["name"] == host)
