#!/usr/bin/env python3
"""Checks examples/dashboard.html in a real headless browser against a running pipeline.

Opens the page from disk in Debian's Chromium (through Playwright's Python package; no browser
download) pointed at the API of a running `weir run examples/iot-dashboard.yaml`, and checks
what a person would see: the status turns to connected, the device table fills, the row
counter keeps growing, and the device filter reconnects with `?device_id=...` and shows only
that device. Any error on the page's console fails the check. Used by the Rust test
`dashboard::the_dashboard_shows_the_live_feed`; by hand:

    API_ADDR=127.0.0.1:9464 weir run examples/iot-dashboard.yaml &
    python3 scripts/check_dashboard.py --api 127.0.0.1:9464 --screenshot docs/dashboard.png

Needs `apt-get install chromium` and `python3 -m pip install 'playwright>=1.40,<2'`
(scripts/test.sh installs both). Exits 0 when every check passes, 1 when one fails, 2 when
the browser or Playwright is missing.
"""
import argparse
import os
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What the page shows, read in one go.
SNAPSHOT = """() => ({
  state: document.getElementById("status").dataset.state,
  status: document.getElementById("status").textContent,
  total: Number(document.getElementById("rows-total").textContent.replace(/[^0-9]/g, "")),
  rate: Number(document.getElementById("rows-rate").textContent.replace(/[^0-9]/g, "")),
  devices: [...document.querySelectorAll("#devices tbody tr")].map((tr) => tr.dataset.device),
  first: [...(document.querySelector("#devices tbody tr")?.cells || [])].map((td) => td.textContent),
  header: [...document.querySelectorAll("#devices thead th")].map((th) => th.textContent),
  feed: document.getElementById("feed-url").textContent,
})"""


class CheckFailed(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--api", default="127.0.0.1:9464", help="host:port of the pipeline's API")
    ap.add_argument("--token", default="", help="the API token, when the pipeline has one")
    ap.add_argument("--page", default=str(REPO / "examples" / "dashboard.html"))
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds each wait may take")
    ap.add_argument("--screenshot", help="save a PNG of the page (with every device) here")
    args = ap.parse_args()

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("check_dashboard: the Python package `playwright` is missing: "
              "python3 -m pip install 'playwright>=1.40,<2' (scripts/test.sh installs it)", file=sys.stderr)
        return 2
    if not os.access(args.chromium, os.X_OK):
        print(f"check_dashboard: no Chromium at {args.chromium}: apt-get install chromium "
              "(scripts/test.sh installs it), or give --chromium PATH", file=sys.stderr)
        return 2

    query = {"api": args.api}
    if args.token:
        query["token"] = args.token
    url = Path(args.page).resolve().as_uri() + "?" + urllib.parse.urlencode(query)
    errors: list[str] = []
    sockets: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760}, locale="en-US")
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.on("websocket", lambda ws: sockets.append(redact(ws.url, args.token)))

            def snapshot() -> dict:
                return page.evaluate(SNAPSHOT)

            def wait_until(what: str, ok) -> dict:
                """Polls the page until `ok(snapshot)` holds; fails naming `what` after the timeout."""
                deadline = time.monotonic() + args.timeout
                while True:
                    s = snapshot()
                    if errors:
                        raise CheckFailed(f"errors on the page while waiting for {what}")
                    if ok(s):
                        return s
                    if time.monotonic() > deadline:
                        raise CheckFailed(f"not within {args.timeout:g} s: {what}; the page shows {s}")
                    page.wait_for_timeout(100)

            try:
                print(f"check_dashboard: opening {redact(url, args.token)}")
                page.goto(url)
                s = wait_until("connected, with devices in the table",
                               lambda s: s["state"] == "connected" and s["devices"] and s["total"] > 0)
                print(f"check_dashboard: {s['status']}, {len(s['devices'])} devices, {s['total']} rows")
                expect(s["header"][:3] == ["device", "readings", "anomalies"] and len(s["header"]) > 3,
                       f"table header: {s['header']}")
                expect(s["first"][0] == s["devices"][0] and all(c.strip() for c in s["first"]),
                       f"first row: {s['first']}")
                before = s["total"]
                s = wait_until(f"more than {before} rows", lambda s: s["total"] > before)
                s = wait_until("a rows/s figure", lambda s: s["rate"] > 0)
                print(f"check_dashboard: {s['total']} rows after {before}, {s['rate']} rows/s")
                expect(s["feed"].endswith("/ws/live"), f"feed address shown: {s['feed']}")
                if args.screenshot:
                    page.screenshot(path=args.screenshot, full_page=True)
                    print(f"check_dashboard: screenshot in {args.screenshot}")

                # The filter: one device, through a new connection with ?device_id=...
                device = s["devices"][len(s["devices"]) // 2]
                page.fill("#device-filter", device)
                page.click("#filter button[type=submit]")
                s = wait_until(f"only {device} in the table",
                               lambda s: s["state"] == "connected" and s["devices"] == [device])
                expect(s["feed"].endswith(f"?device_id={device}"), f"feed address shown: {s['feed']}")
                before = s["total"]
                s = wait_until(f"more rows of {device}", lambda s: s["total"] > before)
                expect(s["devices"] == [device], f"other devices after filtering on {device}: {s['devices']}")
                expect(any(f"device_id={device}" in u for u in sockets), f"no socket asked for {device}: {sockets}")
                print(f"check_dashboard: filtered on {device}: {s['total'] - before} more rows, only that device")
                if errors:
                    raise CheckFailed("errors on the page")
            except CheckFailed as e:
                print(f"check_dashboard: FAILED: {e}", file=sys.stderr)
                for line in errors:
                    print(f"  {line}", file=sys.stderr)
                print(f"  sockets opened: {sockets}", file=sys.stderr)
                return 1
        finally:
            browser.close()
    print("check_dashboard: ok")
    return 0


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def redact(url: str, token: str) -> str:
    return url.replace(urllib.parse.quote(token, safe=""), "***") if token else url


if __name__ == "__main__":
    sys.exit(main())
