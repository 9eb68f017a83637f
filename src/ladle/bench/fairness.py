"""`ladle bench fairness`: two tenants on one server, under each scheduling policy (vtc, fcfs).

Per policy a fresh `ladle serve --scheduling-policy P` (its own data dir and admin key) gets two
tenants through the admin API, `a` and `b` with their weights, and a key each. Then:

1. idle: B alone sends `--idle-requests` requests one after another: its TTFT on an idle server;
2. flood: A sends `--flood` requests at once while B sends one request every `--interval` s
   (`--trickle` of them): B's TTFT P50/P95 against idle (the issue's bar: P95 within 3x);
3. backlog: both send `--backlog` requests at once: the output tokens each tenant received while
   both still had requests not yet started (both backlogged), against their weights' split.

The server runs with --no-admission (the flood queues instead of meeting 429s). Every request
streams `--output-len` tokens (ignore_eos) from a prompt of about `--input-len` words. Results:
benchmarks/results/fairness-*.json and a plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ladle.bench.burst import _percentile, _prompt
from ladle.bench.compare import RunningServer, System
from ladle.bench.http_client import Endpoint, post_json

MODEL = "bench-model"


@dataclass(frozen=True)
class FairnessOptions:
    model: str | None = None  # a GGUF file or HF folder (None: the embedded model)
    policies: tuple[str, ...] = ("vtc", "fcfs")
    flood: int = 200  # tenant A's requests, sent at once
    trickle: int = 20  # tenant B's requests during the flood, one every interval_s
    interval_s: float = 1.0
    backlog: int = 60  # each tenant's requests, all at once, for the weighted split
    idle_requests: int = 5  # B's requests alone, one after another: its idle TTFT
    input_len: int = 32  # words in a prompt (about as many tokens)
    output_len: int = 16  # tokens per completion
    weight_a: float = 1.0
    weight_b: float = 3.0
    max_num_seqs: int = 32  # the server's running-request cap (the flood queues behind it)
    port: int = 8293
    seed: int = 0
    results_dir: str = "benchmarks/results"


@dataclass
class Sent:
    tenant: str
    phase: str  # idle, flood, backlog
    sent_s: float  # since the phase began
    first_token_s: float | None = None  # since the phase began
    token_times_s: list[float] = field(default_factory=list)  # each streamed delta's arrival, since the phase began
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s


def _admin(port: int, admin_key: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _make_tenants(port: int, admin_key: str, opts: FairnessOptions) -> dict[str, str]:
    keys = {}
    for tenant, weight in (("a", opts.weight_a), ("b", opts.weight_b)):
        _admin(port, admin_key, "/admin/tenants", {"id": tenant, "weight": weight, "priority_class": "interactive"})
        keys[tenant] = _admin(port, admin_key, f"/admin/tenants/{tenant}/keys", {"name": "bench"})["key"]
    return keys


async def _one(endpoint: Endpoint, key: str, prompt: str, opts: FairnessOptions, rec: Sent, t0: float) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": opts.output_len, "ignore_eos": True, "stream": True}
    try:
        async for event in post_json(endpoint, "/completions", body, headers={"Authorization": f"Bearer {key}"},
                                     stream=True):  # fmt: skip
            if isinstance(event, dict) and event.get("choices") and event["choices"][0].get("text"):
                now = time.perf_counter() - t0
                rec.token_times_s.append(now)
                if rec.first_token_s is None:
                    rec.first_token_s = now
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, not fatal
        rec.error = f"{type(e).__name__}: {e}"[:300]


async def _idle(endpoint, keys, opts, rng) -> list[Sent]:
    out = []
    t0 = time.perf_counter()
    for _ in range(opts.idle_requests):
        rec = Sent("b", "idle", time.perf_counter() - t0)
        await _one(endpoint, keys["b"], _prompt(rng, opts.input_len), opts, rec, t0)
        out.append(rec)
    return out


async def _flood(endpoint, keys, opts, rng) -> list[Sent]:
    t0 = time.perf_counter()
    records, tasks = [], []
    for _ in range(opts.flood):
        rec = Sent("a", "flood", 0.0)
        records.append(rec)
        tasks.append(asyncio.create_task(_one(endpoint, keys["a"], _prompt(rng, opts.input_len), opts, rec, t0)))
    for i in range(opts.trickle):
        delay = i * opts.interval_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        rec = Sent("b", "flood", time.perf_counter() - t0)
        records.append(rec)
        tasks.append(asyncio.create_task(_one(endpoint, keys["b"], _prompt(rng, opts.input_len), opts, rec, t0)))
    await asyncio.gather(*tasks)
    return records


async def _backlog(endpoint, keys, opts, rng) -> list[Sent]:
    t0 = time.perf_counter()
    records, tasks = [], []
    for i in range(2 * opts.backlog):  # interleaved: neither tenant is ahead by arrival
        tenant = "ab"[i % 2]
        rec = Sent(tenant, "backlog", 0.0)
        records.append(rec)
        tasks.append(asyncio.create_task(_one(endpoint, keys[tenant], _prompt(rng, opts.input_len), opts, rec, t0)))
    await asyncio.gather(*tasks)
    return records


def summarize(records: list[Sent], opts: FairnessOptions) -> dict:
    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    idle = [r.ttft_s for r in records if r.phase == "idle" and r.ttft_s is not None]
    b_flood = [r.ttft_s for r in records if r.phase == "flood" and r.tenant == "b" and r.ttft_s is not None]
    a_flood = [r.ttft_s for r in records if r.phase == "flood" and r.tenant == "a" and r.ttft_s is not None]
    idle_p50 = _percentile(idle, 50)
    backlog = [r for r in records if r.phase == "backlog"]
    # both backlogged until the first moment one tenant has every request started
    last_start = {t: max((r.first_token_s or 1e9) for r in backlog if r.tenant == t) for t in "ab"}
    until = min(last_start.values())
    tokens = {t: sum(1 for r in backlog if r.tenant == t for s in r.token_times_s if s <= until) for t in "ab"}
    ratio = tokens["b"] / tokens["a"] if tokens["a"] else None
    want = opts.weight_b / opts.weight_a
    return {
        "idle_ttft_ms": {"p50": ms(idle_p50), "max": ms(max(idle, default=None))},
        "flood_b_ttft_ms": {
            "p50": ms(_percentile(b_flood, 50)),
            "p95": ms(_percentile(b_flood, 95)),
            "max": ms(max(b_flood, default=None)),
        },
        "flood_b_p95_over_idle": round(_percentile(b_flood, 95) / idle_p50, 2) if b_flood and idle_p50 else None,
        "flood_a_ttft_ms": {"p50": ms(_percentile(a_flood, 50)), "p95": ms(_percentile(a_flood, 95))},
        "backlog_window_s": round(until, 2),
        "backlog_tokens": tokens,
        "backlog_b_over_a": round(ratio, 3) if ratio is not None else None,
        "weights_b_over_a": want,
        "backlog_split_error": round(abs(ratio - want) / want, 3) if ratio is not None else None,
        "errors": sum(r.error is not None for r in records),
        "first_error": next((r.error for r in records if r.error), None),
    }


def run_policy(opts: FairnessOptions, policy: str, log_dir: Path, stamp: str) -> list[Sent]:
    admin_key = "admin-" + secrets.token_hex(8)
    data_dir = tempfile.mkdtemp(prefix="ladle-fairness-")
    # --no-admission: the flood queues instead of meeting 429s
    command = [sys.executable, "-m", "ladle", "serve", "--port", str(opts.port), "--served-model-name", MODEL,
               "--scheduling-policy", policy, "--admin-key", admin_key, "--data-dir", data_dir,
               "--max-num-seqs", str(opts.max_num_seqs), "--max-model-len", "2048",
               "--kv-cache-memory", "0.5", "--no-admission", "--no-embedding-model"]  # fmt: skip
    if opts.model:
        command += ["--model", opts.model]
    server = RunningServer(System(policy, command, "/ready"), opts.port, log_dir / f"fairness-{stamp}-{policy}.log")
    endpoint = Endpoint("127.0.0.1", opts.port, "/v1")
    rng = random.Random(opts.seed)
    try:
        server.wait_ready()
        keys = _make_tenants(opts.port, admin_key, opts)
        records = asyncio.run(_idle(endpoint, keys, opts, rng))
        print(f"[fairness] {policy}: flood of {opts.flood} from a, {opts.trickle} from b", file=sys.stderr)
        records += asyncio.run(_flood(endpoint, keys, opts, rng))
        print(f"[fairness] {policy}: backlog of {opts.backlog} each", file=sys.stderr)
        records += asyncio.run(_backlog(endpoint, keys, opts, rng))
        return records
    finally:
        server.stop()


def main(opts: FairnessOptions) -> int:
    results = Path(opts.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs, report = {}, {"command": "ladle bench fairness", "options": asdict(opts)}
    for policy in opts.policies:
        started = time.perf_counter()
        runs[policy] = run_policy(opts, policy, results, stamp)
        report[policy] = {**summarize(runs[policy], opts), "wall_s": round(time.perf_counter() - started, 1)}
        print(policy, json.dumps(report[policy]))
    report["load_average_at_end"] = os.getloadavg()
    report["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")  # the servers inherit it
    report["requests"] = {p: [asdict(r) for r in rs] for p, rs in runs.items()}
    path = results / f"fairness-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    if _plot(results / f"fairness-{stamp}.png", runs, report):
        print(f"plot: {results / f'fairness-{stamp}.png'}")
    print(f"saved {path}")
    return 0


def _plot(path: Path, runs: dict[str, list[Sent]], report: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, records in runs.items():
        b = sorted((r.sent_s, r.ttft_s) for r in records if r.phase == "flood" and r.tenant == "b" and r.ttft_s)
        if b:
            axes[0].plot(*zip(*b, strict=True), marker="o", label=f"{policy}: B's TTFT during A's flood")
    idle = [report[p]["idle_ttft_ms"]["p50"] for p in runs if report[p]["idle_ttft_ms"]["p50"]]
    if idle:
        axes[0].axhline(3 * min(idle) / 1e3, color="gray", linestyle="--", label="3x idle TTFT")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("B's request sent at (s into the flood)")
    axes[0].set_ylabel("TTFT (s)")
    axes[0].legend(fontsize=8)
    policies = list(runs)
    shares = [report[p]["backlog_b_over_a"] or 0 for p in policies]
    axes[1].bar(policies, shares, color=["tab:green", "tab:gray", "tab:blue"][: len(policies)])
    axes[1].axhline(report[policies[0]]["weights_b_over_a"], color="black", linestyle="--", label="weights b/a")
    axes[1].set_ylabel("tokens b / tokens a, both backlogged")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
