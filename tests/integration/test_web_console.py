"""The web console in a real browser: Debian's chromium, driven by Playwright for
Python, against a real host service (``console_listen`` on loopback) with real tiny
VMs. Screenshots of the main pages land in ``tests/artifacts/web_console/``.

Every wait is on a condition in the page (Playwright's auto-waiting ``expect``), never
a fixed sleep. One service and one browser serve the whole module to stay quick.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Page, expect  # noqa: E402

from parvisor.testing.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402
from parvisor.testing.host_fixture import HostUnderTest  # noqa: E402

pytestmark = pytest.mark.qemu
TOKEN = "test-token-0123456789"
ADMIN, VIEWER = ("ada", "admin-password-1"), ("val", "viewer-password-1")
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'



def _add_user(host: HostUnderTest, name: str, password: str, role: str) -> None:
    subprocess.run([sys.executable, "-m", "parvisor.web.users", "add", name, "--role", role,
                    "--password-stdin"], input=password + "\n", text=True, check=True,
                   env=host.env)


@pytest.fixture(scope="module")
def console_host(tiny_image):
    host = HostUnderTest()
    port = free_port()
    host.state_dir.mkdir(parents=True, exist_ok=True)
    (host.state_dir / "config.toml").write_text(
        f'console_listen = "127.0.0.1:{port}"\napi_tokens = ["{TOKEN}"]\n')
    _add_user(host, *ADMIN, "administrator")
    _add_user(host, *VIEWER, "viewer")
    host.start()
    host.url = f"http://127.0.0.1:{port}"
    yield host
    host.close()


@pytest.fixture(scope="module")
def browser(console_host):
    # depends on console_host so that the service (and its switches) goes after the
    # browser: the switch layer refuses netlink calls while Playwright's loop runs
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (./setup.sh install)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # launch() gives chromium a fresh temporary profile of its own (and removes it)
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _page(browser, console_host) -> Page:
    context = browser.new_context(base_url=console_host.url,
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    return context.new_page()


def _login(page: Page, user: str, password: str, then: str = "/ui/") -> None:
    page.goto(then)
    page.wait_for_url("**/ui/login?next=**")     # not logged in: sent to the login page
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page.locator("#who")).to_contain_text(user)


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_admin_creates_starts_and_types_into_the_console(browser, console_host):
    page = _page(browser, console_host)
    page.goto("/ui/login")
    _shot(page, "login")
    _login(page, *ADMIN, then="/ui/create")
    expect(page.locator("h1")).to_have_text("New virtual machine")

    # a bad size: the message sits next to the memory field and nothing is created
    page.fill("#f-name", "web1")
    page.fill("#f-memory", "12 bananas")
    page.fill("#f-notes", XSS)
    page.click("#create-form button[type=submit]")
    expect(page.locator("#e-memory")).to_contain_text("not a size")
    _shot(page, "create-validation")
    assert console_host.json("vm", "list") == []

    page.fill("#f-memory", "128M")
    page.click("#create-form button[type=submit]")
    page.wait_for_url("**/ui/vms/web1")
    expect(page.locator("#vm-state [data-state]")).to_have_attribute("data-state", "off")
    # the notes are shown as text, and nothing in them ran
    expect(page.locator("dd[data-field=notes]")).to_have_text(XSS)
    assert page.evaluate("window.__xss") is None

    page.evaluate("window.__sameDocument = true")      # survives only without a reload
    page.click("button[data-action=start]")
    expect(page.locator("#vm-state [data-state]")).to_have_attribute("data-state", "running")
    assert page.evaluate("window.__sameDocument") is True

    expect(page.locator("#terminal")).to_have_attribute("data-connected", "yes")
    console_host.wait_agent("web1")      # the guest is up, so its shell answers
    page.locator("#terminal").click()
    page.keyboard.type("echo answer-$((6*7))\n")
    expect(page.locator("#terminal .xterm-rows")).to_contain_text("answer-42")
    _shot(page, "vm")

    page.fill("#f-vcpus", "2")             # hot-add a vCPU to the running guest
    page.click("button[data-action=apply-size]")
    expect(page.locator("dd[data-field=vcpus]")).to_contain_text("2 (max")
    assert console_host.vm("web1")["vcpus"] == 2

    page.goto("/ui/")
    expect(page.locator("tr[data-vm=web1] [data-state]").first).to_have_attribute(
        "data-state", "running")
    _shot(page, "vms")
    page.goto("/ui/events")
    expect(page.locator("#event-rows")).to_contain_text("web1: off -> starting")
    _shot(page, "events")
    page.goto("/ui/jobs")
    _shot(page, "jobs")
    page.context.close()


def test_list_updates_live_and_filters(browser, console_host):
    console_host.create_tiny("live1")
    console_host.create_tiny("other2")
    page = _page(browser, console_host)
    _login(page, *ADMIN)
    row = page.locator("tr[data-vm=live1]")
    expect(row.locator("td.state [data-state]")).to_have_attribute("data-state", "off")
    page.evaluate("window.__sameDocument = true")
    console_host.cli("vm", "start", "live1")          # changed elsewhere: the CLI
    expect(row.locator("td.state [data-state]")).to_have_attribute("data-state", "running")
    assert page.evaluate("window.__sameDocument") is True
    shown = console_host.vm("live1")                   # the list's host column is vm show's
    expect(row.locator("td.host")).to_have_text(shown["host"])
    page.fill("#vm-filter", "other")
    expect(page.locator("#vm-rows tr")).to_have_count(1)
    expect(page.locator("#vm-rows tr")).to_have_attribute("data-vm", "other2")
    console_host.cli("vm", "turn-off", "live1")
    page.context.close()


def test_viewer_sees_but_cannot_act(browser, console_host):
    if "viewme" not in {vm["name"] for vm in console_host.json("vm", "list")}:
        console_host.create_tiny("viewme")
    page = _page(browser, console_host)
    _login(page, *VIEWER, then="/ui/vms/viewme")
    expect(page.locator("#vm-state [data-state]")).to_have_attribute("data-state", "off")
    expect(page.locator("button[data-action=start]")).to_be_hidden()
    expect(page.locator("a[data-page=create]")).to_be_hidden()
    _shot(page, "vm-viewer")
    # sent by hand, with a valid session and CSRF token: still refused by the server
    status = page.evaluate("""async () => {
        const csrf = document.cookie.split('; ').find(c => c.startsWith('parvisor_csrf='))
                     .split('=')[1];
        const r = await fetch('/v1/vms/viewme/start', {method: 'POST',
            headers: {'x-csrf-token': csrf}});
        return [r.status, (await r.json()).error.code];
    }""")
    assert status == [403, "forbidden"]
    assert console_host.state("viewme") == "off"
    page.context.close()


def test_console_listener_refuses_without_login(console_host):
    import httpx
    with httpx.Client(base_url=console_host.url) as client:
        assert client.get("/v1/vms").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.post("/v1/vms", json={"name": "x", "image": "tiny"}).status_code == 401
        with_token = client.get("/v1/vms", headers={"authorization": f"Bearer {TOKEN}"})
        assert with_token.status_code == 200


def _running_vm(host: HostUnderTest, name: str) -> str:
    """The first test's VM when it ran (it is up by now), else one of our own."""
    if name not in {vm["name"] for vm in host.json("vm", "list")}:
        host.create_tiny(name, "--memory", "128M")
    if host.state(name) != "running":
        host.cli("vm", "start", name)
    return name


def test_switches_hot_add_charts_checkpoints_and_a_viewer(browser, console_host):
    vm = _running_vm(console_host, "web1")
    switch = f"wc{os.getpid() % 100000}"         # bridge names derive from it: unique
    page = _page(browser, console_host)
    _login(page, *ADMIN, then="/ui/switches")

    # a bad name: the message sits next to the field and no switch is made
    page.fill("#f-name", "bad name!")
    page.click("#switch-form button[type=submit]")
    expect(page.locator("#e-name")).to_contain_text("not allowed")
    assert console_host.api().get("/v1/switches").json() == []
    page.fill("#f-name", switch)
    page.select_option("#f-type", "private")
    page.click("#switch-form button[type=submit]")
    expect(page.locator(f"tr[data-switch={switch}]")).to_contain_text("private")
    _shot(page, "switches")

    page.goto(f"/ui/vms/{vm}")
    expect(page.locator("#vm-state [data-state]")).to_have_attribute("data-state", "running")
    # NIC hot-add with the switch picker; the devices list follows without a reload
    page.select_option("#f-switch", switch)
    page.click("button[data-action=add-nic]")
    expect(page.locator(".columns")).to_contain_text(f"on switch {switch}")
    assert [n["switch"] for n in console_host.vm(vm)["nics"]] == [switch]
    # a disk: a bad size is refused next to the field, then a good one is added live
    page.fill("#f-size", "lots")
    page.click("button[data-action=add-disk]")
    expect(page.locator("#e-size")).not_to_be_empty()
    assert console_host.vm(vm)["disks"] == []
    page.fill("#f-size", "64M")
    page.click("button[data-action=add-disk]")
    expect(page.locator(".columns")).to_contain_text("disk0")
    # the charts got at least two samples (one per 3 s) of the running guest
    for chart in ("cpu", "memory", "disk", "network"):
        expect(page.locator(f"#chart-{chart}")).to_have_attribute(
            "data-samples", re.compile(r"^([2-9]|\d\d+)$"))
    expect(page.locator("#chart-memory canvas")).to_be_visible()

    # checkpoint: a bad name is refused next to its field; create (live, disks only),
    # then apply with confirmation
    page.fill("#f-checkpoint", "cp/1")
    page.click("button[data-action=create-checkpoint]")
    expect(page.locator("#e-checkpoint")).not_to_be_empty()
    page.fill("#f-checkpoint", "cp1")
    page.click("button[data-action=create-checkpoint]")
    cp1 = page.locator("li[data-checkpoint=cp1]")
    expect(cp1.locator("[data-current]")).to_be_visible()
    _shot(page, "vm-devices-charts-checkpoints")
    cp1.locator("button[data-action=apply-checkpoint]").first.click()
    cp1.locator("button[data-action=confirm-apply-checkpoint]").first.click()
    # a disk-only checkpoint returns a running VM to its disks: it is turned off
    expect(page.locator("#vm-state [data-state]")).to_have_attribute("data-state", "off")
    expect(page.locator("#vm-events")).to_contain_text("checkpoint 'cp1' applied")
    assert console_host.state(vm) == "off"
    # a second one hangs below the first in the tree; deleting it (confirmed) leaves cp1
    page.fill("#f-checkpoint", "cp2")
    page.click("button[data-action=create-checkpoint]")
    cp2 = cp1.locator("li[data-checkpoint=cp2]")
    expect(cp2.locator("[data-current]")).to_be_visible()
    cp2.locator("button[data-action=delete-checkpoint]").click()
    cp2.locator("button[data-action=confirm-delete-checkpoint]").click()
    expect(page.locator("li[data-checkpoint=cp2]")).to_have_count(0)

    # the switch is in use: deleting it is refused and the page says why
    page.goto("/ui/switches")
    row = page.locator(f"tr[data-switch={switch}]")
    row.locator("button[data-action=delete-switch]").click()
    row.locator("button[data-action=confirm-delete-switch]").click()
    expect(row.locator(".row-error")).to_contain_text(f"used by VM '{vm}'")
    assert [s["definition"]["name"] for s in console_host.api().get("/v1/switches").json()] \
        == [switch]

    page.goto("/ui/disks")
    disk_row = page.locator("#disk-rows tr", has_text=vm)
    disk_row.locator("button[data-action=disk-info]").click()
    expect(page.locator("#disk-info dd[data-field=format]")).to_have_text("qcow2")
    _shot(page, "disks")
    page.context.close()

    # a viewer sees the checkpoints but cannot make one, even by hand
    page = _page(browser, console_host)
    _login(page, *VIEWER, then=f"/ui/vms/{vm}")
    expect(page.locator("li[data-checkpoint=cp1]")).to_be_visible()
    expect(page.locator("#create-checkpoint")).to_be_hidden()
    status = page.evaluate("""async (vm) => {
        const csrf = document.cookie.split('; ').find(c => c.startsWith('parvisor_csrf='))
                     .split('=')[1];
        const r = await fetch(`/v1/vms/${vm}/checkpoints`, {method: 'POST',
            headers: {'x-csrf-token': csrf, 'content-type': 'application/json'},
            body: JSON.stringify({name: 'cp2'})});
        return [r.status, (await r.json()).error.code];
    }""", vm)
    assert status == [403, "forbidden"]
    names = [c["name"] for c in console_host.api().get(f"/v1/vms/{vm}/checkpoints")
             .json()["checkpoints"]]
    assert names == ["cp1"]
    page.goto("/ui/cluster")                     # a standalone host says so
    expect(page.locator("#standalone")).to_contain_text("standalone")
    _shot(page, "cluster-standalone")
    page.context.close()
