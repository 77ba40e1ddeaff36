"""Drives the status page in the system's headless Chromium, as a person would: paste the
token, press Show, read what the page shows. Prints one JSON object with what it saw.

    status_page.py <chromium> <base url> <token> <screenshot path> <request id>

Fails (exit 1, with the reason) when the page does not show, within 20 s, the live agent m1,
the invalidation <request id> with its outcome, and the cache left-redis as unattended; or when
the token ends up in storage, a cookie or the URL.
"""

import json
import sys

from playwright.sync_api import sync_playwright

chromium, base, token, screenshot, request_id = sys.argv[1:6]
seen = {}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{base}/ui/")
    page.fill("#token", token)
    page.click("#show")
    agent = page.wait_for_selector('#agents-dev tr[data-agent="m1"]', timeout=20000)
    seen["agent"] = agent.inner_text()
    record = page.wait_for_selector(f'#invalidations-dev tr[data-request="{request_id}"]', timeout=20000)
    seen["invalidation"] = record.inner_text()
    cache = page.wait_for_selector('#caches-dev tr[data-cache="left-redis"]', timeout=20000)
    seen["cache"] = cache.inner_text()
    seen["plot"] = page.eval_on_selector_all("#env-dev canvas", "nodes => nodes.length")
    seen["storage"] = page.evaluate(
        "() => JSON.stringify({local: {...localStorage}, session: {...sessionStorage}, cookie: document.cookie})"
    )
    seen["url"] = page.url
    seen["token_input_cleared"] = page.input_value("#token") == ""
    seen["errors"] = errors
    page.screenshot(path=screenshot, full_page=True)
    browser.close()

problems = []
if "live" not in seen["agent"]:
    problems.append(f"agent m1 is not shown live: {seen['agent']!r}")
if "failed_dependency" not in seen["invalidation"] or "left-redis" not in seen["invalidation"]:
    problems.append(f"the invalidation lacks its outcome: {seen['invalidation']!r}")
if "unattended" not in seen["cache"]:
    problems.append(f"the cache is not shown unattended: {seen['cache']!r}")
if seen["plot"] < 1:
    problems.append("no latency plot")
if token in seen["storage"] or token in seen["url"]:
    problems.append("the token was stored or put in the URL")
if not seen["token_input_cleared"]:
    problems.append("the token stays in the input")
if seen["errors"]:
    problems.append(f"script errors: {seen['errors']}")
print(json.dumps(seen))
if problems:
    print("; ".join(problems), file=sys.stderr)
    sys.exit(1)
