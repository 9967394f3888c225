"""The graphical console in a real browser: noVNC (served from web/node_modules) on
``/ui/vms/NAME/display``, over the service's WebSocket bridge to a running tiny VM's
QEMU VNC socket. Debian's chromium through Playwright, like ``test_web_console.py``.

What is checked against the guest itself: the framebuffer size the VM's VNC server
announces (read here straight from its unix socket, RFB ServerInit) is the size of
noVNC's canvas, and the canvas is not one flat colour (SeaBIOS / kernel text). A
viewer's socket is refused by the server, not merely hidden by the page.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Page, expect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402

from parvisor.testing.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402
from parvisor.testing.host_fixture import HostUnderTest, wait_for  # noqa: E402

pytestmark = pytest.mark.qemu
ADMIN, VIEWER = ("vnc-admin", "admin-password-1"), ("vnc-viewer", "viewer-password-1")
VM = "gfx1"
# how many distinct colours the canvas has (a flat screen has 1), read in the page
CANVAS_FACTS = """() => {
    const canvas = document.querySelector('#screen canvas');
    if (!canvas || !canvas.width) return null;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    for (let i = 0; i < data.length && colours.size < 50; i += 4 * 7)
        colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    return {width: canvas.width, height: canvas.height, colours: colours.size};
}"""



@pytest.fixture(scope="module")
def vnc_host(tiny_image):
    host = HostUnderTest()
    port = free_port()
    host.state_dir.mkdir(parents=True, exist_ok=True)
    (host.state_dir / "config.toml").write_text(f'console_listen = "127.0.0.1:{port}"\n')
    for (name, password), role in ((ADMIN, "administrator"), (VIEWER, "viewer")):
        host.cli("user", "add", name, "--role", role, "--password-stdin", input=password + "\n")
    host.start()
    host.url = f"http://127.0.0.1:{port}"
    host.create_tiny(VM)
    host.cli("vm", "start", VM)
    yield host
    host.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (./setup.sh install)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _logged_in(browser, host: HostUnderTest, user: tuple[str, str], then: str) -> Page:
    context = browser.new_context(base_url=host.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(then)
    page.wait_for_url("**/ui/login?next=**")
    page.fill("input[name=user]", user[0])
    page.fill("input[name=password]", user[1])
    page.click("button[type=submit]")
    page.wait_for_url(f"**{then}")
    return page


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError("the VNC server closed the connection")
        data += chunk
    return data


def vnc_framebuffer_size(path: Path) -> tuple[int, int]:
    """RFB 3.8 handshake with security type None, up to ServerInit's width/height."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        assert _recv_exact(sock, 12).startswith(b"RFB 003.")
        sock.sendall(b"RFB 003.008\n")
        types = _recv_exact(sock, _recv_exact(sock, 1)[0])
        assert 1 in types, f"VNC security types {list(types)} lack None"
        sock.sendall(b"\x01")
        assert _recv_exact(sock, 4) == b"\0\0\0\0"       # SecurityResult OK
        sock.sendall(b"\x01")                              # ClientInit: shared
        return struct.unpack(">HH", _recv_exact(sock, 4))


def _ws_headers(page: Page, host: HostUnderTest) -> dict[str, str]:
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    return {"Cookie": cookies, "Origin": host.url}


def test_administrator_sees_the_guest_screen(browser, vnc_host):
    page = _logged_in(browser, vnc_host, ADMIN, f"/ui/vms/{VM}")
    blocked = []       # the page's Content-Security-Policy must hold with noVNC loaded
    page.on("console", lambda m: blocked.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.click("#display-link")
    page.wait_for_url(f"**/ui/vms/{VM}/display")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")

    vnc_socket = vnc_host.vm_dir(VM) / "vnc.sock"

    def screen_matches():
        facts = page.evaluate(CANVAS_FACTS)
        size = vnc_framebuffer_size(vnc_socket)     # the guest may switch modes: re-read
        return facts if facts and (facts["width"], facts["height"]) == size \
            and facts["colours"] > 1 else None
    facts = wait_for(screen_matches, 30, "noVNC's canvas to show the guest's framebuffer",
                     interval=0.5)
    assert facts["width"] >= 320 and facts["height"] >= 200
    page.screenshot(path=str(ARTIFACTS / "display.png"))
    response = page.request.get(f"/ui/vms/{VM}/display")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert blocked == []

    # the same bridge by hand: the first bytes are the VM's RFB greeting
    with ws_connect(f"ws://{vnc_host.url.split('://')[1]}/v1/vms/{VM}/display",
                    additional_headers=_ws_headers(page, vnc_host)) as ws:
        assert ws.recv(timeout=10).startswith(b"RFB 003.")
    page.context.close()


def test_viewer_is_refused_by_the_server(browser, vnc_host):
    page = _logged_in(browser, vnc_host, VIEWER, f"/ui/vms/{VM}/display")
    expect(page.locator("#status")).to_have_attribute("data-state", "failed")
    expect(page.locator("#message")).to_contain_text("administrator role")
    # sent by hand with the viewer's live session from the console's own origin
    url = f"ws://{vnc_host.url.split('://')[1]}/v1/vms/{VM}/display"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=_ws_headers(page, vnc_host), open_timeout=10)
    assert refused.value.response.status_code == 403
    opened = page.evaluate("""(url) => new Promise((done) => {
        const ws = new WebSocket(url);
        ws.onopen = () => done('open');
        ws.onclose = (e) => done('closed ' + e.code);
    })""", url)
    assert opened.startswith("closed")
    page.context.close()
