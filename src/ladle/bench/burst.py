"""`ladle bench burst`: a burst far above capacity, against a config whose model has a TTFT
target and a `degrade_to` model, served twice: with admission on, then off.

First the small model's capacity is measured (requests/s finished with its batch full, closed
loop); then `--multiple` times that many requests a second arrive, evenly spaced, for
`--duration` seconds, each a stream of `--output-len` tokens from a prompt of `--input-len`
random words. Every request ends as one of: served (by the model asked for), degraded (by its
`degrade_to` model), rejected (429; the client waits Retry-After and tries again, up to
`--retries` times: it then ends as retried-ok or retried-rejected), or failed (anything else).
The result: counts per outcome, TTFT P50/P95/P99 of the requests answered at once and of the
retried ones, the share of all served requests past 1.2x the target, how long the 429s took to
come, per mode, in benchmarks/results/burst-*.json with a plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ladle.bench.compare import RunningServer, System
from ladle.bench.http_client import Endpoint, HTTPStatusError, post_json
from ladle.errors import LadleError


@dataclass(frozen=True)
class BurstOptions:
    config: str  # the config file the servers run
    model: str  # the model the burst asks for (it needs a TTFT target and a degrade_to)
    multiple: float = 3.0  # arrivals per second, as a multiple of the small model's measured capacity
    duration_s: float = 20.0
    input_len: int = 128
    output_len: int = 32
    retries: int = 3  # a 429'd client tries again this many times after Retry-After
    port: int = 8291
    seed: int = 0
    results_dir: str = "benchmarks/results"


@dataclass
class Outcome:
    sent_s: float  # since the burst began
    outcome: str = "failed"  # served, degraded, rejected, retried-ok, retried-rejected, failed
    routed_to: str | None = None
    ttft_s: float | None = None  # of the attempt that was answered (a retried one's from its retry)
    tries: int = 1
    retry_after_s: list[int] = field(default_factory=list)
    rejected_in_s: list[float] = field(default_factory=list)  # how long each 429 took to come
    error: str | None = None


WORDS = ("the of and to in is was for on that with as by at from river city music light stone paper garden "
         "winter market code function return value list").split()  # fmt: skip


def _prompt(rng: random.Random, n: int) -> str:
    """About n tokens of text (a word is about a token): any model's tokenizer reads it."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def _attempt(endpoint: Endpoint, model: str, prompt: str, opts: BurstOptions, started: float):
    """(TTFT, routed-to) of one streamed request sent at `started`; raises HTTPStatusError."""
    body = {"model": model, "prompt": prompt, "max_tokens": opts.output_len, "ignore_eos": True, "stream": True}
    headers: dict[str, str] = {}
    ttft = None
    async for event in post_json(endpoint, "/completions", body, stream=True, response_headers=headers):
        if ttft is None and isinstance(event, dict) and event.get("choices") and event["choices"][0].get("text"):
            ttft = time.perf_counter() - started
    return (ttft if ttft is not None else time.perf_counter() - started), headers.get("x-ladle-routed-to", model)


async def _client(endpoint, opts: BurstOptions, prompt, out: Outcome) -> None:
    for attempt in range(opts.retries + 1):
        started = time.perf_counter()
        try:
            ttft, routed = await _attempt(endpoint, opts.model, prompt, opts, started)
        except HTTPStatusError as e:
            if e.status != 429 or "retry-after" not in e.headers:
                out.outcome, out.error = "failed", f"HTTP {e.status}: {e.body[:200]}"
                return
            wait = int(e.headers["retry-after"])
            out.retry_after_s.append(wait)
            out.rejected_in_s.append(time.perf_counter() - started)
            out.outcome = "rejected" if attempt == 0 else "retried-rejected"
            if attempt == opts.retries:
                out.outcome = "retried-rejected"
                return
            await asyncio.sleep(wait)
            out.tries += 1
            continue
        except (OSError, ValueError) as e:
            out.outcome, out.error = "failed", f"{type(e).__name__}: {e}"
            return
        out.routed_to, out.ttft_s = routed, ttft
        out.outcome = "retried-ok" if attempt else "served" if routed == opts.model else "degraded"
        return


async def _capacity(endpoint: Endpoint, model: str, opts: BurstOptions, concurrency: int) -> float:
    """Requests per second the model finishes with `concurrency` in flight, closed loop."""
    rng = random.Random(opts.seed + 1)
    total = 2 * concurrency
    queue = list(range(total))

    async def worker():
        while queue:
            queue.pop()
            body = {"model": model, "prompt": _prompt(rng, opts.input_len), "max_tokens": opts.output_len,
                    "ignore_eos": True}  # fmt: skip
            async for _ in post_json(endpoint, "/completions", body):
                pass

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def _burst(endpoint: Endpoint, opts: BurstOptions, rate: float) -> list[Outcome]:
    rng = random.Random(opts.seed)
    count = max(1, round(rate * opts.duration_s))
    outcomes = [Outcome(sent_s=i / rate) for i in range(count)]
    prompts = [_prompt(rng, opts.input_len) for _ in range(count)]
    started = time.perf_counter()
    tasks = []
    for out, prompt in zip(outcomes, prompts, strict=True):
        delay = out.sent_s - (time.perf_counter() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_client(endpoint, opts, prompt, out)))
    await asyncio.gather(*tasks)
    return outcomes


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summarize(outcomes: list[Outcome], target_s: float) -> dict:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    at_once = [o.ttft_s for o in outcomes if o.outcome in ("served", "degraded") and o.ttft_s is not None]
    retried = [o.ttft_s for o in outcomes if o.outcome == "retried-ok" and o.ttft_s is not None]
    answered = at_once + retried
    rejections = [s for o in outcomes for s in o.rejected_in_s]
    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    pcts = lambda vs: {f"p{p}": ms(_percentile(vs, p)) for p in (50, 95, 99)}  # noqa: E731
    return {
        "requests": len(outcomes),
        "counts": counts,
        "ttft_ms": pcts(at_once),  # the requests served or degraded at their first try
        "ttft_ms_retried_ok": pcts(retried),  # from the retry that was served
        "share_over_1.2x_target": round(sum(t > 1.2 * target_s for t in answered) / len(answered), 4)
        if answered else None,  # of every served request, retried ones included
        "max_ttft_ms": ms(max(answered, default=None)),
        "rejected_in_ms": {**pcts(rejections), "max": ms(max(rejections, default=None))},  # time to each 429
        "retry_after_s": sorted({s for o in outcomes for s in o.retry_after_s}),
    }  # fmt: skip


def run_mode(opts: BurstOptions, admission: bool, rate: float | None, log_dir: Path, stamp: str):
    command = [sys.executable, "-m", "ladle", "serve", "--config", opts.config, "--port", str(opts.port)]
    label = "admission-on" if admission else "admission-off"
    server = RunningServer(System(label, command + ([] if admission else ["--no-admission"]), "/ready"),
                           opts.port, log_dir / f"burst-{stamp}-{label}.log")  # fmt: skip
    endpoint = Endpoint("127.0.0.1", opts.port, "/v1")
    try:
        server.wait_ready()
        if rate is None:
            from ladle.config_file import load_config_file

            cfg = load_config_file(opts.config)
            small = cfg.model(cfg.model(opts.model).degrade_to)
            capacity = asyncio.run(_capacity(endpoint, small.name, opts, small.engine.scheduler.max_num_seqs))
            rate = opts.multiple * capacity
            print(f"[burst] {small.name} finishes {capacity:.2f} requests/s: the burst sends {rate:.2f}/s",
                  file=sys.stderr)  # fmt: skip
        print(f"[burst] {label}: {rate * opts.duration_s:.0f} requests over {opts.duration_s:g} s", file=sys.stderr)
        return rate, asyncio.run(_burst(endpoint, opts, rate))
    finally:
        server.stop()


def main(opts: BurstOptions) -> int:
    from ladle.config_file import load_config_file

    cfg = load_config_file(opts.config)
    entry = cfg.model(opts.model)
    if entry.targets.ttft_ms is None or entry.degrade_to is None:
        raise LadleError(f"model {opts.model!r} needs a TTFT target and a degrade_to model in {opts.config}")
    target_s = entry.targets.ttft_ms / 1e3
    results = Path(opts.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rate, on = run_mode(opts, True, None, results, stamp)
    _, off = run_mode(opts, False, rate, results, stamp)
    report = {
        "command": "ladle bench burst",
        "options": asdict(opts),
        "ttft_target_ms": entry.targets.ttft_ms,
        "rate_per_s": rate,
        "load_average_at_end": os.getloadavg(),
        "admission_on": summarize(on, target_s),
        "admission_off": summarize(off, target_s),
        "requests": {"admission_on": [asdict(o) for o in on], "admission_off": [asdict(o) for o in off]},
    }
    path = results / f"burst-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    for mode in ("admission_on", "admission_off"):
        print(mode, json.dumps(report[mode]))
    if _plot(results / f"burst-{stamp}.png", on, off, target_s):
        print(f"plot: {results / f'burst-{stamp}.png'}")
    print(f"saved {path}")
    return 0


COLORS = {"served": "tab:green", "degraded": "tab:blue", "retried-ok": "tab:orange", "rejected": "tab:red",
          "retried-rejected": "tab:red", "failed": "black"}  # fmt: skip


def _plot(path: Path, on: list[Outcome], off: list[Outcome], target_s: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, outcomes, title in ((axes[0], on, "admission on"), (axes[1], off, "admission off")):
        for name, color in COLORS.items():
            pts = [(o.sent_s, o.ttft_s) for o in outcomes if o.outcome == name and o.ttft_s is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=10, color=color, label=name)
        rejected = [o.sent_s for o in outcomes if o.outcome in ("rejected", "retried-ok", "retried-rejected")]
        if rejected:
            ax.scatter(rejected, [0] * len(rejected), marker="|", color="tab:red", label="429 (then retried)")
        ax.axhline(target_s, color="gray", linestyle="--", label="TTFT target")
        ax.axhline(1.2 * target_s, color="gray", linestyle=":", label="1.2x target")
        ax.set_title(title)
        ax.set_xlabel("sent at (s into the burst)")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("TTFT (s; a retried request's from its retry)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
