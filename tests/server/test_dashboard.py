"""The dashboard: GET /admin/stats behind the admin key, the page public, and the page itself in
headless Chromium (Debian's `chromium`, driven by Playwright, no browser download) against a live
server under light load: the key form, the models table, the charts drawn with data, a screenshot."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from helpers import ServerProcess

ADMIN_KEY = "admin-dash-1"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def server(tiny_models):
    server = ServerProcess(
        "--model", str(tiny_models["llama"].gguf_path), "--served-model-name", "tiny", "--admin-key", ADMIN_KEY,
        "--kv-cache-memory", "0.02",
    )  # fmt: skip
    yield server
    server.stop()


def complete(server, max_tokens: int = 12):
    body = {"model": "tiny", "prompt": "the dashboard draws", "max_tokens": max_tokens, "temperature": 0}
    return server.request("POST", "/v1/completions", body)


def test_the_page_is_public_and_the_stats_need_the_admin_key(server):
    status, headers, text = server.request("GET", "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html") and "Admin key" in text
    assert "default-src 'self'" in headers["content-security-policy"]
    for name in ("dashboard.js", "uPlot.iife.min.js", "uPlot.min.css"):
        assert server.request("GET", f"/dashboard/{name}")[0] == 200, name
    assert server.request("GET", "/dashboard/..%2Fapp.py")[0] == 404
    assert server.request("GET", "/dashboard/dashboard.html")[0] == 404  # only the listed files
    status, _, body = server.request("GET", "/admin/stats")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    for bad in ("abc", "0", "100000", "nan"):
        status, _, body = server.request("GET", f"/admin/stats?window_s={bad}", headers=ADMIN)
        assert status == 400 and body["error"]["param"] == "window_s", bad


def test_stats_show_the_tokens_requests_and_latencies_of_the_last_minutes(server):
    status, _, body = complete(server)
    assert status == 200
    usage = body["usage"]
    status, _, stats = server.request("GET", "/admin/stats?window_s=60", headers=ADMIN)
    assert status == 200 and stats["object"] == "stats" and stats["bucket_s"] == 5
    models = {m["name"]: m for m in stats["models"]}  # the embedded embedding model beside it
    model = models["tiny"]
    assert (model["kind"], model["state"]) == ("llm", "ready")
    assert model["kv_cache_tokens"] > 0 and 0 <= model["kv_usage"] <= 1 and model["waiting"] >= 0
    buckets = model["buckets"]
    assert all(b["t"] % 5 == 0 for b in buckets) and [b["t"] for b in buckets] == sorted({b["t"] for b in buckets})
    assert 1 <= len(buckets) <= 12 and buckets[-1]["t"] <= stats["now"] < buckets[-1]["t"] + 5
    assert buckets[0]["t"] >= max(stats["now"] - 60, stats["started"]) - 5  # none before the start
    window = model["window"]
    assert window["requests"] >= 1 and window["output_tokens"] >= usage["completion_tokens"]
    assert window["prompt_tokens"] >= usage["prompt_tokens"] and window["ttft_p50_s"] > 0
    assert window["latency_p95_s"] >= window["latency_p50_s"] >= window["ttft_p50_s"]
    assert sum(b["requests"] for b in model["buckets"]) == window["requests"]
    # the gauges, sampled each second (the first sample may still be due on a busy machine), leave their peaks
    deadline = time.monotonic() + 120
    while not any(b["running_max"] is not None and b["kv_usage_max"] is not None for b in model["buckets"]):
        assert time.monotonic() < deadline, "no gauge sample reached the live series in 120 s"
        time.sleep(0.5)
        model = next(m for m in server.request("GET", "/admin/stats?window_s=60", headers=ADMIN)[2]["models"]
                     if m["name"] == "tiny")  # fmt: skip


@pytest.fixture(scope="module")  # before the server starts
def chromium():
    """Debian's chromium's path, with Playwright, or a skip that says what is missing (a failure
    under CI=true)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    executable = shutil.which("chromium")
    if executable is None:
        missing.append("Debian's chromium (apt-get install -y chromium; make install-test does it as root)")
    if missing:
        message = "the dashboard's browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return executable


class Load:
    """A few completions a second in a thread while the page is open."""

    def __init__(self, server):
        self.server, self.stop, self.statuses = server, threading.Event(), []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.statuses.append(complete(self.server, max_tokens=16)[0])
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


CHARTS_HAVE_DATA = """() => {
  const d = window.ladleDashboard, c = d && d.charts;
  if (!c || !c["live.tokens"] || !c["live.ttft"] || !c["live.queue"] || !c["live.kv"]) return false;
  const some = (u, ok) => u.data.slice(1).some((s) => s.some(ok));
  const u = c["live.tokens"], i = u.series.findIndex((s) => s.label === "tiny output");
  const busy = i > 0 ? u.data[i].filter((v) => v > 0).length : 0;  // buckets with output tokens
  return busy >= 3 && some(c["live.tokens"], (v) => v > 0) && some(c["live.requests"], (v) => v > 0)
    && some(c["live.ttft"], (v) => v !== null && v > 0) && some(c["live.latency"], (v) => v !== null && v > 0)
    && some(c["live.queue"], (v) => v !== null) && some(c["live.kv"], (v) => v !== null) && d.usageState !== "";
}"""


def test_the_dashboard_draws_the_live_charts_in_chromium(chromium, server):
    from playwright.sync_api import sync_playwright

    with Load(server) as load, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            # the browser's own lines for a refused request or /v1/usage's 404 are expected
            page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                    and page_errors.append(m.text))  # fmt: skip
            page.goto(server.url + "/dashboard")
            page.fill("#key", "not-the-key")  # a wrong key: a message, not a blank page
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            assert "refused" in page.inner_text("#error") and page.is_hidden("#main")

            page.fill("#key", ADMIN_KEY)
            page.click("#key-form button[type=submit]")
            page.wait_for_function(CHARTS_HAVE_DATA, timeout=180_000, polling=500)
            assert page.is_hidden("#error") and page.is_visible("#main")
            row = page.locator('#models tr[data-model="tiny"]')
            assert row.locator("td").nth(2).inner_text() == "ready"
            assert page.locator("#live-charts canvas").count() >= 6
            _check_usage(page)
            RESULTS.mkdir(parents=True, exist_ok=True)
            shot = RESULTS / f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert page.evaluate("sessionStorage.getItem('ladle.adminKey')") == ADMIN_KEY
            assert not page_errors, page_errors
        finally:
            browser.close()
    assert load.statuses and all(s == 200 for s in load.statuses)


def _check_usage(page) -> None:
    """Until /v1/usage exists the page says there is no usage data; with it, a row per tenant."""
    state = page.evaluate("window.ladleDashboard.usageState")
    if state == "data":
        assert page.locator("#tenants tbody tr").count() >= 1
        assert page.evaluate("window.ladleDashboard.charts['usage.tokens'].data[1].some((v) => v > 0)")
    else:
        assert state in ("unavailable", "empty") and "No usage data" in page.inner_text("#usage-note")


def _range_s(url: str) -> float:
    from datetime import datetime
    from urllib.parse import parse_qs, urlparse

    q = parse_qs(urlparse(url).query)
    start, end = (datetime.fromisoformat(q[k][0].replace("Z", "+00:00")) for k in ("start", "end"))
    return (end - start).total_seconds()


USAGE = {  # the format of GET /v1/usage (docs/tenants.md), as a server with the ledger answers
    "object": "list", "start": "2026-12-03T10:00:00Z", "end": "2026-12-03T13:00:00Z", "granularity": "hour",
    "group_by": ["tenant"],
    "data": [
        {"bucket": f"2026-12-03T{h}:00:00Z", "tenant": tenant, "model": None, "requests": 3 * n,
         "prompt_tokens": 100 * n, "cached_tokens": 0, "completion_tokens": 50 * n, "total_tokens": 150 * n,
         "engine_s": 1.5 * n, "cost": 0.01 * n}
        for h, tenant, n in (("10", "team-a", 1), ("11", "team-a", 2), ("11", "team-b", 5), ("12", "team-b", 1))
    ],
}  # fmt: skip


def test_the_dashboard_draws_usage_by_tenant_from_v1_usage(chromium, server):
    """/v1/usage as the ledger's branch serves it (answered by the browser here, so the page is
    checked against the documented format whether or not this server has the ledger)."""
    import json

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page_errors, asked = [], []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            one_row = {**USAGE, "data": USAGE["data"][:1]}
            answers = {86400: USAGE, 3600: one_row, 604800: {**USAGE, "data": []}}  # by the range asked

            def usage(route):
                asked.append(route.request.url)
                body = answers[round(_range_s(route.request.url))]
                route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

            page.route("**/v1/usage?*", usage)
            page.goto(server.url + "/dashboard")
            page.fill("#key", ADMIN_KEY)
            page.click("#key-form button[type=submit]")
            page.wait_for_function("() => window.ladleDashboard.usageState === 'data'", timeout=60_000)
            rows = page.locator("#tenants tbody tr")
            assert [rows.nth(i).get_attribute("data-tenant") for i in range(rows.count())] == ["team-a", "team-b"]
            assert rows.nth(1).locator("td").nth(4).inner_text() == "900"  # team-b's total tokens
            charts = page.evaluate(
                "Object.fromEntries(['usage.tokens', 'usage.cost', 'usage.tokens_time'].map((id) =>"
                " [id, window.ladleDashboard.charts[id].data]))"
            )
            assert charts["usage.tokens"][1] == [450, 900]
            assert [round(c, 4) for c in charts["usage.cost"][1]] == [0.03, 0.06]
            assert len(charts["usage.tokens_time"][0]) == 3  # three hours, a series per tenant
            assert charts["usage.tokens_time"][1:] == [[150, 300, 0], [0, 750, 150]]
            assert page.locator("#usage-charts canvas").count() == 3
            assert "group_by=tenant" in asked[0] and "granularity=hour" in asked[0]

            page.select_option("#range", "3600")  # the last hour: one tenant, one bucket
            page.wait_for_function("() => document.querySelectorAll('#tenants tbody tr').length === 1")
            assert page.evaluate("window.ladleDashboard.charts['usage.tokens'].data") == [[0], [150]]
            page.select_option("#range", "604800")  # the last 7 days: nothing
            page.wait_for_function("() => window.ladleDashboard.usageState === 'empty'")
            assert page.inner_text("#usage-note") == "No usage data in this range." and page.is_hidden("#usage-body")
            assert {round(_range_s(url)) for url in asked} == {3600, 86400, 604800}
            assert not page_errors, page_errors
        finally:
            browser.close()
