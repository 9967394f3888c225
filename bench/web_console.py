"""Web console figures: VM list page load with 1,000 VMs, and update latency.

    .venv/bin/python bench/web_console.py [--vms 1000] [--runs 7]

A real host service (``parvisor.testing.host_fixture``) with ``console_listen`` on
loopback, N defined VMs (off) plus one running tiny VM, and Debian's chromium driven by
Playwright.

1. **Page load**: a logged-in browser opens ``/ui/`` in a fresh page; the time from
   ``goto`` until the table shows all N rows (``#vm-count`` says "N of N VMs"), median
   of ``--runs``. Baseline in the same process: ``GET /v1/vms`` for the same VMs over
   the same listener with httpx (what a script pays for the data alone).
2. **Update latency**: the running VM is paused/resumed through the API; a
   MutationObserver in the page stamps ``Date.now()`` when its row's state badge changes.
   Latency = browser stamp - the moment the API call returned (the store had changed
   by then). Median over ``--runs`` pause/resume pairs.

Everything started here is stopped by PID (``HostUnderTest.close``).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import httpx
from playwright.sync_api import sync_playwright

from parvisor.testing.guest_fixtures import tiny_image_for_tests
from parvisor.testing.host_fixture import HostUnderTest, wait_for

TOKEN = "bench-token-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WATCH_ROW = """name => new Promise(ready => {
  window.__changes = [];
  const observer = new MutationObserver(() => {
    const badge = document.querySelector(`tr[data-vm="${name}"] td.state [data-state]`);
    if (badge && badge.dataset.state !== window.__last) {
      window.__last = badge.dataset.state;
      window.__changes.push([badge.dataset.state, Date.now()]);
    }
  });
  observer.observe(document.getElementById('vm-rows'), {subtree: true, childList: true,
                                                        attributes: true});
  ready(true);
})"""


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _populate(host: HostUnderTest, count: int) -> None:
    with host.api() as api:
        for index in range(count):
            api.post("/v1/vms", json={"name": f"vm{index:04d}", "image": "tiny",
                                      "memory": "64M"}).raise_for_status()
        api.post("/v1/vms", json={"name": "live", "image": "tiny"}).raise_for_status()
        api.post("/v1/vms/live/start").raise_for_status()
    wait_for(lambda: host.state("live") == "running", 60, "the live VM")


def page_load(browser, url: str, count: int, runs: int) -> tuple[list[float], list[float]]:
    context = browser.new_context(base_url=url, bypass_csp=True)   # for wait_for_function
    context.request.post("/ui/api/login", data={"token": TOKEN})
    loads = []
    for _ in range(runs):
        page = context.new_page()
        started = time.perf_counter()
        page.goto("/ui/")
        page.wait_for_function(f"document.getElementById('vm-count')?.textContent"
                               f" === '{count + 1} of {count + 1} VMs'", timeout=60_000)
        loads.append(time.perf_counter() - started)
        page.close()
    context.close()
    baseline = []
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}) as client:
        for _ in range(runs):
            started = time.perf_counter()
            assert len(client.get("/v1/vms").json()) == count + 1
            baseline.append(time.perf_counter() - started)
    return loads, baseline


def update_latency(browser, host: HostUnderTest, url: str, runs: int) -> list[float]:
    context = browser.new_context(base_url=url, bypass_csp=True)   # for wait_for_function
    context.request.post("/ui/api/login", data={"token": TOKEN})
    page = context.new_page()
    page.goto("/ui/")
    page.wait_for_selector('tr[data-vm="live"] [data-state="running"]', timeout=60_000)
    page.evaluate(WATCH_ROW, "live")
    latencies = []
    with host.api() as api:
        for action, shown in [("pause", "paused"), ("resume", "running")] * runs:
            api.post(f"/v1/vms/live/{action}").raise_for_status()
            returned_ms = time.time() * 1000
            page.wait_for_function(f"window.__last === '{shown}'", timeout=30_000)
            stamp = page.evaluate("window.__changes[window.__changes.length - 1][1]")
            latencies.append(max(0.0, stamp - returned_ms) / 1000)
    context.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    tiny_image_for_tests()
    host, port = HostUnderTest(), _port()
    host.state_dir.mkdir(parents=True, exist_ok=True)
    (host.state_dir / "config.toml").write_text(
        f'console_listen = "127.0.0.1:{port}"\napi_tokens = ["{TOKEN}"]\n')
    url = f"http://127.0.0.1:{port}"
    try:
        host.start()
        started = time.perf_counter()
        _populate(host, args.vms)
        print(f"created {args.vms} VMs in {time.perf_counter() - started:.1f} s")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=CHROMIUM_ARGS)
            loads, baseline = page_load(browser, url, args.vms, args.runs)
            latencies = update_latency(browser, host, url, args.runs)
            browser.close()
    finally:
        host.close()
    _report(args, loads, baseline, latencies)


def _report(args, loads: list[float], baseline: list[float], latencies: list[float]) -> None:
    load, base = statistics.median(loads), statistics.median(baseline)
    print(f"VM list page with {args.vms + 1} VMs: median {load * 1000:.0f} ms "
          f"(min {min(loads) * 1000:.0f}, max {max(loads) * 1000:.0f}; {len(loads)} runs)")
    print(f"baseline GET /v1/vms (same VMs, httpx): median {base * 1000:.0f} ms; "
          f"ratio page/API {load / base:.1f}")
    print(f"update latency state change -> browser: median {statistics.median(latencies) * 1000:.0f}"
          f" ms (min {min(latencies) * 1000:.0f}, max {max(latencies) * 1000:.0f};"
          f" {len(latencies)} changes)")


if __name__ == "__main__":
    main()
