"""`ladle bench serve`: load an OpenAI-compatible server and report throughput and latency.

Works against any server that speaks the OpenAI API (Ladle, vLLM, llama.cpp's server), so peers
are measured with the same tool. Prompts are generated locally: random token ids of given
lengths (sent to /v1/completions, so every server sees exactly the same tokens), prompts sharing
a prefix, a chat-like mix of lengths, or editing requests (a code file and the request to repeat
it with a small change, the workload where speculative decoding shines), sent to /v1/chat/completions.
Where the server exports speculative-decoding counters on /metrics (Ladle's or vLLM's), the summary
gives the acceptance of the run. Several models (`--served-model-name a,b`) share the load in
turn, request by request, and each gets its own summary beside the total.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ladle.bench.http_client import Endpoint, HTTPStatusError, post_json

DATASETS = ("random", "shared-prefix", "chat", "editing")
# after the code: small models follow an instruction at the end of the prompt far more often
# (SmolLM2-135M keeps 39% of n-gram guesses this way, 27% with the instruction first)
EDIT_INSTRUCTION = "Repeat the code above exactly, with the comment `# reviewed` added as its first line."


@dataclass
class BenchRequest:
    prompt_ids: list[int] | None  # completions: exact token ids
    messages: list[dict] | None  # chat: a conversation
    prompt_len: int  # tokens in the prompt (for chat: of the text before the template)
    output_len: int  # max_tokens (EOS ignored unless --no-ignore-eos)


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    status: int = 0
    model: str = ""  # the name it was sent to

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# -- datasets ----------------------------------------------------------------------------------------


def build_dataset(args, tokenizer) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    specials = set(tokenizer.stop_token_ids) | {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t}
    vocab = [i for i in range(min(tokenizer.vocab_size, 1 << 20)) if i not in specials]

    def tokens(n: int) -> list[int]:
        return [rng.choice(vocab) for _ in range(n)]

    def length(mean: int) -> int:
        r = args.range_ratio
        return max(1, int(mean * rng.uniform(1 - r, 1 + r))) if r else mean

    out = []
    if args.dataset == "random":
        for _ in range(args.num_prompts):
            n = length(args.input_len)
            out.append(BenchRequest(tokens(n), None, n, length(args.output_len)))
    elif args.dataset == "shared-prefix":
        prefix = tokens(args.prefix_len)
        for _ in range(args.num_prompts):
            n = length(args.input_len)
            out.append(BenchRequest(prefix + tokens(n), None, args.prefix_len + n, length(args.output_len)))
    elif args.dataset == "editing":
        files = code_files(tokenizer, args.input_len)
        for i in range(args.num_prompts):
            code = files[i % len(files)]
            text = f"```python\n{code}```\n\n{EDIT_INSTRUCTION}"
            out.append(
                BenchRequest(None, [{"role": "user", "content": text}], len(tokenizer.encode(text)), args.output_len)
            )
    else:  # chat: prompt and answer lengths spread like conversations (log-normal, clipped)
        words = [w for w in (tokenizer.decode([t]).strip() for t in rng.sample(vocab, 2000)) if w.isalpha()]
        for _ in range(args.num_prompts):
            n_words = int(min(max(rng.lognormvariate(math.log(args.input_len * 0.7), 0.8), 4), args.input_len * 4))
            text = " ".join(rng.choice(words) for _ in range(n_words))
            n_out = int(min(max(rng.lognormvariate(math.log(args.output_len), 0.6), 8), args.output_len * 3))
            out.append(BenchRequest(None, [{"role": "user", "content": text}], len(tokenizer.encode(text)), n_out))
    return out


def code_files(tokenizer, num_tokens: int) -> list[str]:
    """Ladle's own Python sources, each cut at a line end to about num_tokens tokens, longest first."""
    root = Path(__file__).resolve().parents[1]
    files = []
    for path in sorted(root.rglob("*.py")):
        lines, kept, used = path.read_text().splitlines(keepends=True), [], 0
        for line in lines:
            used += len(tokenizer.encode(line, add_special_tokens=False))
            if used > num_tokens:
                break
            kept.append(line)
        if used > num_tokens:  # only files at least that long: every prompt has the asked length
            files.append("".join(kept))
    if not files:
        raise ValueError(f"no source file has {num_tokens} tokens: lower --input-len")
    return files


def spec_counters(base_url: str) -> dict[str, float] | None:
    """Speculative-decoding counters from the server's /metrics, summed over models (None: none)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
                if sample.name.endswith(f"spec_decode_{key}_total"):
                    counters[key] = counters.get(key, 0.0) + sample.value
    return counters or None


def speculation_summary(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    return {
        **d,
        "acceptance_rate": d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else None,
        "mean_accepted_length": 1 + d["num_accepted_tokens"] / d["num_drafts"] if d["num_drafts"] else None,
    }


# -- load --------------------------------------------------------------------------------------------


async def one_request(endpoint: Endpoint, model: str, req: BenchRequest, args) -> RequestResult:
    body = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if req.messages is not None:
        path, body["messages"] = "/chat/completions", req.messages
    else:
        path, body["prompt"] = "/completions", req.prompt_ids
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    result = RequestResult(ok=False, prompt_len=req.prompt_len, model=model)
    start = time.perf_counter()
    last = None
    pieces = 0
    try:
        async for event in post_json(endpoint, path, body, headers, stream=True):
            now = time.perf_counter()
            if event == "[DONE]":
                break
            if event.get("usage"):
                result.output_tokens = event["usage"].get("completion_tokens", 0)
            for choice in event.get("choices") or ():
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if not text:
                    continue
                pieces += 1
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
        result.e2e_s = time.perf_counter() - start
        result.output_tokens = result.output_tokens or pieces
        result.ok = last is not None
        if not result.ok:
            result.error = "no tokens received"
    except HTTPStatusError as e:
        result.error, result.status = str(e), e.status
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(
    endpoint: Endpoint,
    models: list[str],
    requests: list[BenchRequest],
    args,
    concurrency: int | None,
    rate: float,
    progress,
) -> tuple[list[RequestResult], float]:
    """Send every request, the i-th to models[i % len(models)]: at most `concurrency` at once (None:
    no limit), arrivals spaced as a Poisson process of `rate` per second (inf: all at once).
    Returns results and the duration."""
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    results: list[RequestResult | None] = [None] * len(requests)

    async def run(i: int, req: BenchRequest):
        model = models[i % len(models)]
        if limit is not None:
            async with limit:
                results[i] = await one_request(endpoint, model, req, args)
        else:
            results[i] = await one_request(endpoint, model, req, args)
        progress.update(1)

    start = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        tasks.append(asyncio.create_task(run(i, req)))
        if rate != math.inf:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


# -- report ------------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    ordered = sorted(values)

    def pct(p):
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"mean_ms": 1000 * statistics.fmean(values), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99)}


def summarize(results: list[RequestResult], duration_s: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    good = [r for r in ok if _meets(r, slo)]
    statuses: dict[str, int] = {}
    for r in results:
        if not r.ok:
            statuses[str(r.status or "error")] = statuses.get(str(r.status or "error"), 0) + 1
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures_by_status": statuses,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_tokens_per_s": out_tokens / duration_s,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration_s,
        "goodput_requests_per_s": len(good) / duration_s if slo else None,
        "slo_ms": slo,
        "ttft": _percentiles([r.ttft_s for r in ok]),
        "tpot": _percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl": _percentiles([x for r in ok for x in r.itl_s]),
        "e2e": _percentiles([r.e2e_s for r in ok]),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "first_error": next((r.error for r in results if not r.ok), None),
    }


def _meets(r: RequestResult, slo: dict[str, float]) -> bool:
    got = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2e": r.e2e_s}
    return all(got[k] * 1000 <= v for k, v in slo.items())


def parse_slo(spec: str | None) -> dict[str, float]:
    """'ttft:500,tpot:50' → {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slo = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition(":")
        if key.strip() not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"--goodput takes ttft:MS,tpot:MS,e2e:MS, got {part!r}")
        slo[key.strip()] = float(value)
    return slo


def summarize_models(results: list[RequestResult], duration_s: float, slo: dict[str, float], models: list[str]):
    """The summary of all results, with one per model under "per_model" when there are several."""
    summary = summarize(results, duration_s, slo)
    if len(models) > 1:
        summary["per_model"] = {m: summarize([r for r in results if r.model == m], duration_s, slo) for m in models}
    return summary


def print_summary(label: str, load: str, s: dict) -> None:
    def row(name, d):
        if d["mean_ms"] is None:
            return f"  {name:5s} n/a"
        return (
            f"  {name:5s} mean {d['mean_ms']:9.1f}  p50 {d['p50_ms']:9.1f}  p95 {d['p95_ms']:9.1f}  "
            f"p99 {d['p99_ms']:9.1f} ms"
        )

    print(
        f"[{label}] {load}: {s['completed']}/{s['num_requests']} ok in {s['duration_s']:.1f} s | "
        f"{s['request_throughput']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s, "
        f"{s['total_tokens_per_s']:.1f} total tok/s"
        + (f", goodput {s['goodput_requests_per_s']:.2f} req/s" if s["goodput_requests_per_s"] is not None else "")
    )
    for name in ("ttft", "tpot", "itl", "e2e"):
        print(row(name, s[name]))
    spec = s.get("speculation")
    if spec and spec["num_draft_tokens"]:
        print(
            f"  speculation: {spec['num_accepted_tokens']:.0f} of {spec['num_draft_tokens']:.0f} guesses kept "
            f"({spec['acceptance_rate']:.1%}), {spec['mean_accepted_length']:.2f} tokens per speculating step"
        )
    if s["failed"]:
        print(f"  failures: {s['failures_by_status']}; first: {s['first_error']}")
    for model, m in (s.get("per_model") or {}).items():
        tpot = m["tpot"]["p50_ms"]
        print(
            f"  model {model}: {m['completed']}/{m['num_requests']} ok, {m['output_tokens_per_s']:.1f} output tok/s, "
            f"TTFT p50 {m['ttft']['p50_ms'] or 0:.1f} ms, TPOT p50 {tpot or 0:.1f} ms"
        )


def plot(path: Path, label: str, points: list[tuple[str, dict]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    xs = [p[0] for p in points]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    a.plot(xs, [p[1]["output_tokens_per_s"] for p in points], "o-", label="output tok/s")
    a.plot(xs, [p[1]["total_tokens_per_s"] for p in points], "s--", label="total tok/s")
    a.set_title("throughput")
    for name, axis in (("ttft", b), ("tpot", c)):
        for pct, style in (("p50_ms", "o-"), ("p95_ms", "^--"), ("p99_ms", "s:")):
            axis.plot(xs, [p[1][name][pct] or 0 for p in points], style, label=pct.replace("_ms", ""))
        axis.set_title(f"{name.upper()} (ms)")
    for axis in (a, b, c):
        axis.set_xlabel("load (concurrency or rate)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"ladle bench serve: {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- entry point -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeBenchOptions:
    """What `ladle bench serve` runs: the CLI builds it from its flags, `bench compare` directly."""

    base_url: str = "http://127.0.0.1:8000/v1"  # the server's OpenAI base URL
    model: str | None = None  # the model the server runs, for its tokenizer and name (None: embedded)
    served_model_name: str | None = None  # the model name(s) sent, comma-separated, if not the model's own
    api_key: str | None = None
    dataset: str = "random"  # random, shared-prefix, chat, editing
    num_prompts: int = 128
    input_len: int = 256  # prompt tokens (mean for chat)
    output_len: int = 128  # output tokens (mean for chat)
    prefix_len: int = 512  # shared-prefix: shared tokens
    range_ratio: float = 0.0  # lengths spread uniformly by +-this share
    concurrency: int = 32  # requests in flight at most
    request_rate: float | None = None  # Poisson arrivals per second instead of a fixed concurrency
    sweep: str | None = None  # comma-separated concurrencies (or rates) to run in turn
    goodput: str | None = None  # latency targets, e.g. ttft:2000,tpot:100 (ms)
    ignore_eos: bool = True
    warmup: int = 2  # short requests sent first
    seed: int = 0
    label: str = "ladle"  # the system under test, for files and output
    results_dir: str = "benchmarks/results"

    @classmethod
    def from_namespace(cls, args) -> ServeBenchOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(args: ServeBenchOptions) -> int:
    points = measure(args)
    return 0 if all(p[1]["completed"] for p in points) else 1


def measure(args: ServeBenchOptions) -> list[tuple[str, dict]]:
    """Run every load of `args` against the server, print and save the results; returns
    (load label, summary) pairs."""
    from tqdm import tqdm

    from ladle.model.loader import load_tokenizer
    from ladle.model.source import resolve_model

    endpoint = Endpoint.parse(args.base_url)
    models = served_names(args.served_model_name)
    source = resolve_model(args.model, models[0] if models else None)
    models = models or [source.name]
    tokenizer = load_tokenizer(source)
    slo = parse_slo(args.goodput)
    requests = build_dataset(args, tokenizer)
    loads = _loads(args)
    points = []
    for load_label, concurrency, rate in loads:
        if args.warmup:
            warm = [
                BenchRequest(tokens.prompt_ids, tokens.messages, tokens.prompt_len, 4)
                for tokens in requests[: args.warmup]
            ]
            asyncio.run(run_load(endpoint, models, warm * len(models), args, None, math.inf, _Quiet()))
        counters = spec_counters(args.base_url)
        with tqdm(total=len(requests), desc=f"{args.label} {load_label}", file=sys.stderr, leave=False) as bar:
            results, duration = asyncio.run(run_load(endpoint, models, requests, args, concurrency, rate, bar))
        summary = summarize_models(results, duration, slo, models)
        summary["speculation"] = speculation_summary(counters, spec_counters(args.base_url))
        print_summary(args.label, load_label, summary)
        points.append((load_label, summary))
    _save(args, ",".join(models), points)
    return points


def served_names(spec: str | None) -> list[str]:
    """'a, b' → ['a', 'b'] (the models to load, in turn); None → [] (the model's own name)."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--served-model-name names a model twice: {spec!r}")
    return names


class _Quiet:
    def update(self, n):
        pass


def _loads(args) -> list[tuple[str, int | None, float]]:
    if args.sweep:
        values = [v.strip() for v in args.sweep.split(",") if v.strip()]
        if args.request_rate is not None:
            return [(f"rate={v}", None, float(v)) for v in values]
        return [(f"c={v}", int(v), math.inf) for v in values]
    if args.request_rate is not None:
        return [(f"rate={args.request_rate}", args.concurrency, args.request_rate)]
    return [(f"c={args.concurrency}", args.concurrency, math.inf)]


def _save(args, model: str, points) -> None:
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out / f"serve-{args.label}-{args.dataset}-{stamp}"
    payload = {
        "command": "ladle bench serve",
        "label": args.label,
        "model": model,
        "base_url": args.base_url,
        "args": {k: v for k, v in dataclasses.asdict(args).items() if k != "api_key"},
        "points": [{"load": label, **summary} for label, summary in points],
    }
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"saved {base.with_suffix('.json')}")
    if plot(base.with_suffix(".png"), f"{args.label}, {args.dataset}", points):
        print(f"saved {base.with_suffix('.png')}")
