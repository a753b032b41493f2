#!/usr/bin/env python3
"""Checks the web console of a running `weir run` in a real headless browser.

Opens http://API/ in Debian's Chromium (through Playwright's Python package; no browser
download) and checks what a person would see: the pipeline's graph with every node, numbers
that move while it runs (rows/s, a node's rows in), charts drawn, an open alert that the
Acknowledge button acknowledges (the token typed once into the page's prompt), and recent dead
letters filtered by kind. Any error on the page's console fails the check. Used by the Rust test
`console::the_console_shows_the_running_pipeline_and_acknowledges_an_alert`; by hand:

    WEIR_API_TOKEN=s3cret weir run examples/demo-alerts.yaml --metrics-addr 127.0.0.1:9464 &
    python3 scripts/check_console.py --api 127.0.0.1:9464 --token s3cret --screenshot docs/console.png

Exits 0 when every check passes, 1 when one fails, 2 when the browser or Playwright is missing.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

SNAPSHOT = """() => ({
  phase: document.getElementById("phase").textContent,
  rateIn: document.getElementById("rate-in").textContent,
  nodes: [...document.querySelectorAll("#graph g.node")].map((g) => g.dataset.id),
  rowsIn: Object.fromEntries([...document.querySelectorAll("#graph g.node")].map((g) => [g.dataset.id, Number(g.dataset.rowsIn || 0)])),
  rates: [...document.querySelectorAll("#graph g.node text.rates")].map((t) => t.textContent),
  alerts: [...document.querySelectorAll("#alerts tbody tr[data-alert]")].map((tr) => ({ id: tr.dataset.alert, state: tr.cells[0].textContent })),
  deadLetters: [...document.querySelectorAll("#dead-letters tbody tr")].filter((tr) => tr.cells.length > 1).map((tr) => tr.cells[1].textContent),
  kinds: [...document.querySelectorAll("#dl-kind option")].map((o) => o.value).filter(Boolean),
  chartInk: (() => { const c = document.getElementById("chart-rates"); const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                     let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; })(),
  message: document.getElementById("alert-message").textContent,
})"""


class CheckFailed(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--api", default="127.0.0.1:9464", help="host:port of the pipeline's API")
    ap.add_argument("--token", required=True, help="the pipeline's API token (typed into the page's prompt)")
    ap.add_argument("--nodes", type=int, default=0, help="how many graph nodes the pipeline has (0: any)")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds each wait may take")
    ap.add_argument("--screenshot", help="save a PNG of the page here")
    args = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("check_console: the Python package `playwright` is missing: "
              "python3 -m pip install 'playwright>=1.40,<2' (scripts/test.sh installs it)", file=sys.stderr)
        return 2
    if not os.access(args.chromium, os.X_OK):
        print(f"check_console: no Chromium at {args.chromium}: apt-get install chromium", file=sys.stderr)
        return 2

    errors: list[str] = []
    prompts: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="en-US")
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))

            def on_dialog(d):
                prompts.append(d.message)
                d.accept(args.token)
            page.on("dialog", on_dialog)

            def wait_until(what, ok):
                deadline = time.monotonic() + args.timeout
                while True:
                    s = page.evaluate(SNAPSHOT)
                    if errors:
                        raise CheckFailed(f"errors on the page while waiting for {what}")
                    if ok(s):
                        return s
                    if time.monotonic() > deadline:
                        raise CheckFailed(f"not within {args.timeout:g} s: {what}; the page shows {s}")
                    page.wait_for_timeout(100)

            try:
                page.goto(f"http://{args.api}/")
                s = wait_until("the graph, running", lambda s: s["phase"] == "running" and s["nodes"]
                               and (args.nodes == 0 or len(s["nodes"]) == args.nodes))
                print(f"check_console: graph of {len(s['nodes'])} nodes: {', '.join(s['nodes'])}")
                # The endless source: its count keeps growing while the job runs.
                first = s["nodes"][0]
                before = s["rowsIn"][first]
                s = wait_until(f"{first} taking more rows than {before}", lambda s: s["rowsIn"][first] > before)
                s = wait_until("a rows/s figure", lambda s: s["rateIn"] not in ("", "–") and all("→" in r for r in s["rates"]))
                print(f"check_console: {s['rateIn']} rows/s in; {first} at {s['rowsIn'][first]} rows; node rates {s['rates']}")
                s = wait_until("the throughput chart drawn", lambda s: s["chartInk"] > 500)
                s = wait_until("an alert firing", lambda s: any(a["state"] == "firing" for a in s["alerts"]))
                alert = next(a["id"] for a in s["alerts"] if a["state"] == "firing")
                page.click(f'#alerts tr[data-alert="{alert}"] button.ack')
                s = wait_until(f"{alert} acknowledged on the page",
                               lambda s: any(a["id"] == alert and a["state"] == "acknowledged" for a in s["alerts"]))
                if len(prompts) != 1:
                    raise CheckFailed(f"the token should be asked for once, not {len(prompts)} times: {prompts}")
                with urllib.request.urlopen(f"http://{args.api}/alerts/{urllib.request.quote(alert, safe='')}") as r:
                    state = json.load(r)["state"]
                if state != "acknowledged":
                    raise CheckFailed(f"the API says {alert} is {state}")
                print(f"check_console: acknowledged {alert} from the page ({s['message']})")
                s = wait_until("recent dead letters with their kinds", lambda s: s["deadLetters"] and s["kinds"])
                kind = s["kinds"][0]
                page.select_option("#dl-kind", kind)
                s = wait_until(f"only `{kind}` dead letters", lambda s: s["deadLetters"] and set(s["deadLetters"]) == {kind})
                print(f"check_console: {len(s['deadLetters'])} recent dead letters of kind {kind}")
                if args.screenshot:
                    page.select_option("#dl-kind", "")
                    page.wait_for_timeout(1500)
                    page.screenshot(path=args.screenshot, full_page=True)
                    print(f"check_console: screenshot in {args.screenshot}")
                if errors:
                    raise CheckFailed("errors on the page")
            except CheckFailed as e:
                print(f"check_console: FAILED: {e}", file=sys.stderr)
                for line in errors:
                    print(f"  {line}", file=sys.stderr)
                return 1
        finally:
            browser.close()
    print("check_console: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
