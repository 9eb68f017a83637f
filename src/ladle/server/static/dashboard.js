// Ladle's dashboard: reads the JSON APIs a script would (GET /admin/models, /admin/stats,
// /v1/usage) with the admin key typed into the page, and draws them with uPlot (vendored).
// Plain JS, no build step. window.ladleDashboard exposes the charts and the last answers (tests).
"use strict";
(() => {
  const KEY_STORAGE = "ladle.adminKey";
  const POLL_MS = 3000;
  const USAGE_POLL_MS = 30000;
  const HEIGHT = 220;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const $ = (id) => document.getElementById(id);
  const dash = (window.ladleDashboard = {
    charts: {}, // id -> uPlot
    models: null, // the last GET /admin/models
    stats: null, // the last GET /admin/stats
    usage: null, // the last GET /v1/usage
    usageState: "", // "data", "empty" or "unavailable"
    refreshes: 0,
    errors: 0,
  });
  let key = sessionStorage.getItem(KEY_STORAGE) || "";
  let timer = null;
  let usageTimer = null;

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function getJSON(path) {
    let response;
    try {
      response = await fetch(path, { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
    } catch (e) {
      throw new HttpError(0, "cannot reach the server (" + e.message + ")");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null; // not JSON
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message;
      throw new HttpError(response.status, message || response.status + " " + response.statusText);
    }
    return body;
  }

  // -- formatting ------------------------------------------------------------------------------
  const num = (v, digits = 0) =>
    v === null || v === undefined ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: digits });
  const secs = (v) => (v === null || v === undefined ? "–" : v < 1 ? num(v * 1e3, 0) + " ms" : num(v, 2) + " s");
  const pct = (v) => (v === null || v === undefined ? "–" : num(v * 100, 1) + " %");
  const color = (i) => COLORS[i % COLORS.length];

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  // -- status and errors -----------------------------------------------------------------------
  function showError(text) {
    $("error").textContent = text || "";
    $("error").hidden = !text;
  }

  function stop() {
    clearTimeout(timer);
    clearTimeout(usageTimer);
    timer = usageTimer = null;
  }

  function refused(e) {
    stop();
    $("main").hidden = true;
    $("hello").hidden = false;
    $("status").textContent = "not connected";
    showError("The admin key was refused (HTTP " + e.status + "): " + e.message);
  }

  // -- charts ----------------------------------------------------------------------------------
  function chartBox(containerId, id, title) {
    let box = document.querySelector('[data-chart="' + id + '"]');
    if (!box) {
      box = document.createElement("div");
      box.className = "chart";
      box.dataset.chart = id;
      const h = document.createElement("h3");
      h.textContent = title;
      box.appendChild(h);
      $(containerId).appendChild(box);
    }
    return box;
  }

  // The uPlot chart `id`, made again when its series changed (a model or tenant came or went).
  function chart(containerId, id, title, series, data, extra = {}) {
    const labels = series.map((s) => s.label).join("\n");
    let u = dash.charts[id];
    if (u && u.ladleLabels !== labels) {
      u.destroy();
      u = null;
    }
    if (!u) {
      const box = chartBox(containerId, id, title);
      const opts = {
        width: Math.max(box.clientWidth - 8, 300),
        height: HEIGHT,
        series: [{}, ...series.map((s) => ({ width: 1.5, spanGaps: false, ...s }))],
        scales: { x: { time: true }, ...(extra.yRange ? { y: { range: extra.yRange } } : {}) },
        axes: [{}, { size: 64, ...(extra.yValues ? { values: extra.yValues } : {}) }],
        legend: { live: false },
        ...extra.opts,
      };
      u = new uPlot(opts, data, box);
      u.ladleLabels = labels;
      dash.charts[id] = u;
    } else {
      u.setData(data);
    }
    return u;
  }

  window.addEventListener("resize", () => {
    for (const u of Object.values(dash.charts)) {
      const box = u.root.parentElement;
      u.setSize({ width: Math.max(box.clientWidth - 8, 300), height: HEIGHT });
    }
  });

  // -- models and live series -------------------------------------------------------------------
  function renderModels(models, stats) {
    const live = Object.fromEntries(stats.models.map((m) => [m.name, m]));
    const body = document.querySelector("#models tbody");
    body.textContent = "";
    for (const m of models.models) {
      const s = live[m.name] || {};
      const w = s.window || {};
      const row = document.createElement("tr");
      row.dataset.model = m.name;
      cell(row, m.name);
      cell(row, m.kind);
      const state = cell(row, m.state, "state-" + m.state);
      if (m.error) state.title = m.error;
      cell(row, num(m.in_flight), "num");
      cell(row, num(s.running), "num");
      cell(row, num(s.waiting), "num");
      cell(row, pct(s.kv_usage), "num");
      cell(row, num(w.tokens_per_s, 1), "num");
      cell(row, secs(w.ttft_p50_s) + " / " + secs(w.ttft_p95_s), "num");
      cell(row, secs(w.latency_p50_s) + " / " + secs(w.latency_p95_s), "num");
      body.appendChild(row);
    }
  }

  // one series per model and field of the buckets; a field marked llm only for generating models
  function bucketChart(stats, id, title, fields, yValues, yRange) {
    const series = [];
    const data = [stats.models.length ? stats.models[0].buckets.map((b) => b.t) : []];
    stats.models.forEach((m, i) => {
      for (const [field, suffix, dashed, llmOnly] of fields) {
        if (llmOnly && m.kind !== "llm") continue;
        series.push({ label: m.name + suffix, stroke: color(i), ...(dashed ? { dash: [6, 4] } : {}) });
        data.push(m.buckets.map((b) => b[field]));
      }
    });
    chart("live-charts", id, title, series, data, { yValues, yRange });
  }

  const secondsAxis = (u, ticks) => ticks.map((v) => secs(v));
  const percentAxis = (u, ticks) => ticks.map((v) => num(v * 100, 0) + "%");

  const fromZero = (u, min, max) => [0, max > 0 ? max * 1.1 : 1]; // y from 0, some room above
  const fromZeroS = (u, min, max) => [0, max > 0 ? max * 1.1 : 0.01];
  const unit = () => [0, 1];

  function renderLive(stats) {
    bucketChart(stats, "live.tokens", "Tokens/s (output; prompt dashed)", [
      ["tokens_per_s", " output", false, true],
      ["prompt_tokens_per_s", " prompt", true],
    ], null, fromZero);
    bucketChart(stats, "live.requests", "Requests per 5 s (errors dashed)", [
      ["requests", " requests"],
      ["errors", " errors", true],
    ], null, fromZero);
    bucketChart(stats, "live.ttft", "Time to first token, P50 (P95 dashed)", [
      ["ttft_p50_s", " P50", false, true],
      ["ttft_p95_s", " P95", true, true],
    ], secondsAxis, fromZeroS);
    bucketChart(stats, "live.latency", "Request latency, P50 (P95 dashed)", [
      ["latency_p50_s", " P50", false, true],
      ["latency_p95_s", " P95", true, true],
    ], secondsAxis, fromZeroS);
    bucketChart(stats, "live.queue", "Queue: most running (waiting dashed) per 5 s", [
      ["running_max", " running", false, true],
      ["waiting_max", " waiting", true],
    ], null, fromZero);
    bucketChart(stats, "live.kv", "KV-cache usage, highest per 5 s", [["kv_usage_max", " KV", false, true]],
      percentAxis, unit);
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const windowS = $("window").value;
      const [models, stats] = await Promise.all([
        getJSON("/admin/models"),
        getJSON("/admin/stats?window_s=" + encodeURIComponent(windowS)),
      ]);
      if (!key) return; // the key was forgotten meanwhile
      dash.models = models;
      dash.stats = stats;
      showError("");
      $("hello").hidden = true;
      $("main").hidden = false; // before drawing: the charts take their width from it
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
      renderModels(models, stats);
      renderLive(stats);
      dash.refreshes += 1;
      if (usageTimer === null) refreshUsage();
    } catch (e) {
      dash.errors += 1;
      if (e.status === 401 || e.status === 403) return refused(e);
      showError("Could not read the server's stats: " + e.message + " (retrying)");
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  // -- usage by tenant --------------------------------------------------------------------------
  function usageNote(text) {
    $("usage-note").textContent = text;
    $("usage-note").hidden = !text;
    $("usage-body").hidden = !!text;
  }

  async function refreshUsage() {
    clearTimeout(usageTimer);
    usageTimer = setTimeout(refreshUsage, USAGE_POLL_MS); // set first: refresh() reads it
    const end = new Date();
    const start = new Date(end.getTime() - Number($("range").value) * 1000);
    const query = new URLSearchParams({
      group_by: "tenant", granularity: "hour", start: start.toISOString(), end: end.toISOString(),
    });
    try {
      const usage = await getJSON("/v1/usage?" + query);
      dash.usage = usage;
      renderUsage(usage, start);
    } catch (e) {
      if (e.status === 401 || e.status === 403) return refused(e);
      dash.usage = null;
      dash.usageState = "unavailable";
      usageNote(
        e.status === 404
          ? "No usage data: this server has no usage API yet (GET /v1/usage answered 404)."
          : "No usage data: GET /v1/usage failed: " + e.message
      );
    }
  }

  function renderUsage(usage, start) {
    const rows = usage.data || [];
    if (!rows.length) {
      dash.usageState = "empty";
      return usageNote("No usage data in this range.");
    }
    dash.usageState = "data";
    usageNote("");
    const totals = new Map(); // tenant -> sums
    const byTime = new Map(); // bucket time -> tenant -> total tokens
    for (const r of rows) {
      const tenant = r.tenant || "(all)";
      const t = r.bucket ? Date.parse(r.bucket) / 1000 : start.getTime() / 1000;
      const sum = totals.get(tenant) || { requests: 0, prompt: 0, completion: 0, total: 0, engine_s: 0, cost: 0 };
      sum.requests += r.requests || 0;
      sum.prompt += r.prompt_tokens || 0;
      sum.completion += r.completion_tokens || 0;
      sum.total += r.total_tokens || 0;
      sum.engine_s += r.engine_s || 0;
      sum.cost += r.cost || 0;
      totals.set(tenant, sum);
      if (!byTime.has(t)) byTime.set(t, new Map());
      byTime.get(t).set(tenant, (byTime.get(t).get(tenant) || 0) + (r.total_tokens || 0));
    }
    const tenants = [...totals.keys()].sort();
    const body = document.querySelector("#tenants tbody");
    body.textContent = "";
    for (const tenant of tenants) {
      const s = totals.get(tenant);
      const row = document.createElement("tr");
      row.dataset.tenant = tenant;
      cell(row, tenant);
      for (const v of [s.requests, s.prompt, s.completion, s.total]) cell(row, num(v), "num");
      cell(row, num(s.engine_s, 1), "num");
      cell(row, num(s.cost, 4), "num");
      body.appendChild(row);
    }
    const times = [...byTime.keys()].sort((a, b) => a - b);
    const tenantSeries = tenants.map((t, i) => ({ label: t, stroke: color(i), points: { show: true } }));
    chart("usage-charts", "usage.tokens_time", "Tokens per hour by tenant", tenantSeries, [
      times, ...tenants.map((tenant) => times.map((t) => byTime.get(t).get(tenant) || 0)),
    ]);
    barChart("usage.tokens", "Tokens by tenant (prompt + completion)", tenants, tenants.map((t) => totals.get(t).total));
    barChart("usage.cost", "Cost by tenant", tenants, tenants.map((t) => totals.get(t).cost));
  }

  function barChart(id, title, names, values) {
    const xs = names.map((_, i) => i);
    chart("usage-charts", id, title, [{ label: title.split(" ")[0], stroke: color(0), fill: color(0) + "88",
      paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false } }], [xs, values], {
      opts: {
        scales: { x: { time: false, range: [-0.5, names.length - 0.5] }, y: { range: fromZero } },
        axes: [
          { splits: () => xs, values: (u, ticks) => ticks.map((i) => names[i] ?? "") },
          { size: 64 },
        ],
        legend: { show: false },
      },
    });
  }

  // -- the key form -----------------------------------------------------------------------------
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    key = $("key").value.trim();
    if (!key) return showError("Enter the admin key (the server's --admin-key).");
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key").value = "";
    stop();
    refresh();
  });
  $("forget").addEventListener("click", () => {
    stop();
    key = "";
    sessionStorage.removeItem(KEY_STORAGE);
    $("main").hidden = true;
    $("hello").hidden = false;
    $("status").textContent = "not connected";
    showError("");
  });
  $("window").addEventListener("change", () => refresh());
  $("range").addEventListener("change", () => refreshUsage());
  if (key) refresh();
})();
