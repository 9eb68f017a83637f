"""`ladle bench embeddings`: dynamic batching against batch size 1, and an LLM beside the load.

`--clients` closed-loop clients (64) each send one sentence per request to /v1/embeddings
(base64, as OpenAI's client asks; each on its own kept-alive connection, as pooled clients do)
for `--duration` seconds, against a server whose embedding model
batches (`--max-batch-size`, `--max-queue-delay-ms`) and one with max_batch_size 1. Then, on the
batching server, `--llm-streams` concurrent streamed completions (`--output-len` tokens each) run
alone, and then together with the embedding load: each side's throughput and latency against
itself alone says whether one starves the other. Result: JSON and a plot in benchmarks/results/
(embeddings-*.json/.png), with the load average of the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ladle.bench.compare import RunningServer, System
from ladle.bench.http_client import Endpoint, HTTPStatusError, KeepAlive, post_json

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A cup of coffee in the morning helps me think.",
    "Interest rates rose by a quarter point on Tuesday.",
    "She plays the violin in a small orchestra.",
    "Ünïcødé text, numbers like 3.14159 and 42, and punctuation!",
    "How do I reset my password if I forgot the email?",
    "The train to Lyon leaves at 9:45 from platform 3.",
    "Embeddings map sentences to vectors of numbers.",
)


@dataclass(frozen=True)
class EmbeddingBenchOptions:
    clients: int = 64  # concurrent embedding clients, one sentence per request
    duration_s: float = 20.0  # of each phase
    max_batch_size: int = 32  # of the batching server
    max_queue_delay_ms: float = 5.0
    llm_streams: int = 8  # concurrent streamed completions in the LLM phases (0: skip them)
    output_len: int = 64  # tokens per completion
    model: str | None = None  # the LLM (default: the embedded one)
    embedding_model: str | None = None  # default: the embedded MiniLM
    runtime: str = "torch"  # what runs the embedding model: torch or onnxruntime (--embedding-runtime)
    port: int = 8293
    results_dir: str = "benchmarks/results"


@dataclass
class Load:
    """What one side of a phase measured."""

    latencies_s: list[float] = field(default_factory=list)  # per request
    ttfts_s: list[float] = field(default_factory=list)  # LLM streams only
    tpots_s: list[float] = field(default_factory=list)  # LLM streams only: mean gap after the first token
    num_tokens: int = 0  # LLM tokens received
    num_errors: int = 0
    errors: list[str] = field(default_factory=list)  # the first few
    elapsed_s: float = 0.0

    def summary(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
        out = {
            "requests": len(self.latencies_s),
            "errors": self.num_errors,
            "elapsed_s": round(self.elapsed_s, 2),
            "requests_per_s": round(len(self.latencies_s) / self.elapsed_s, 2) if self.elapsed_s else None,
            "latency_ms": {f"p{p}": ms(percentile(self.latencies_s, p)) for p in (50, 90, 99)},
        }
        if self.ttfts_s:
            out["tokens_per_s"] = round(self.num_tokens / self.elapsed_s, 2)
            out["ttft_ms"] = {f"p{p}": ms(percentile(self.ttfts_s, p)) for p in (50, 99)}
            out["tpot_ms"] = {f"p{p}": ms(percentile(self.tpots_s, p)) for p in (50, 99)}
        if self.errors:
            out["first_errors"] = self.errors[:3]
        return out

    def fail(self, e: Exception) -> None:
        self.num_errors += 1
        if len(self.errors) < 3:
            self.errors.append(str(e)[:200])


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def embedding_clients(endpoint: Endpoint, model: str, clients: int, duration_s: float) -> Load:
    load = Load()
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client(i: int) -> None:
        n = i
        conn = KeepAlive(endpoint)  # one kept-alive connection per client, as a pooled client has
        try:
            while time.perf_counter() < stop_at:
                body = {"model": model, "input": SENTENCES[n % len(SENTENCES)], "encoding_format": "base64"}
                n += clients
                t0 = time.perf_counter()
                try:
                    await conn.post_json("/embeddings", body)
                    load.latencies_s.append(time.perf_counter() - t0)
                except (HTTPStatusError, OSError) as e:
                    load.fail(e)
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    load.elapsed_s = time.perf_counter() - started
    return load


async def llm_streams(endpoint: Endpoint, model: str, streams: int, output_len: int, duration_s: float) -> Load:
    load = Load()
    started = time.perf_counter()
    stop_at = started + duration_s

    async def stream(i: int) -> None:
        while time.perf_counter() < stop_at:
            prompt = f"Write a story about the number {i} and a river. " * 4
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "stream": True}
            t0 = time.perf_counter()
            first = last = None
            tokens = 0
            try:
                async for event in post_json(endpoint, "/completions", body, stream=True):
                    if isinstance(event, dict) and event.get("choices") and event["choices"][0].get("text"):
                        last = time.perf_counter()
                        first = first or last
                        tokens += 1
            except (HTTPStatusError, OSError) as e:
                load.fail(e)
                continue
            load.latencies_s.append(time.perf_counter() - t0)
            load.num_tokens += tokens
            if first is not None:
                load.ttfts_s.append(first - t0)
                if tokens > 1:
                    load.tpots_s.append((last - first) / (tokens - 1))

    await asyncio.gather(*(stream(i) for i in range(streams)))
    load.elapsed_s = time.perf_counter() - started
    return load


def _batch_sizes(port: int, model: str) -> dict:
    """The embedding model's batch-size histogram from /metrics: batches, inputs, mean size."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "ladle_batch_size":
            for s in family.samples:
                if s.labels.get("model_name") == model and s.name.endswith(("_count", "_sum")):
                    out[s.name.rsplit("_", 1)[1]] = s.value
    count, total = out.get("count", 0.0), out.get("sum", 0.0)
    return {"batches": int(count), "inputs": int(total), "mean_batch_size": round(total / count, 2) if count else None}


def _served(port: int) -> tuple[str, str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
        data = json.loads(resp.read())["data"]
    llm = next(m["id"] for m in data if m.get("kind") == "llm")
    embedding = next(m["id"] for m in data if m.get("kind") == "embedding")
    return llm, embedding


def _server(opts: EmbeddingBenchOptions, max_batch_size: int, log: Path) -> RunningServer:
    command = [sys.executable, "-m", "ladle", "serve", "--port", str(opts.port)]
    command += ["--embedding-max-batch-size", str(max_batch_size)]
    command += ["--embedding-max-queue-delay-ms", str(opts.max_queue_delay_ms)]
    # the embedded LLM as `make serve` runs it in the tests: a 2048-token context, a small cache
    command += ["--model", opts.model] if opts.model else ["--max-model-len", "2048", "--kv-cache-memory", "0.5"]
    command += ["--embedding-model", opts.embedding_model] if opts.embedding_model else []
    command += ["--embedding-runtime", opts.runtime]
    return RunningServer(System(f"bs{max_batch_size}", command, "/ready"), opts.port, log)


def run_server(opts: EmbeddingBenchOptions, max_batch_size: int, with_llm: bool, log: Path) -> dict:
    """The phases on one server: embeddings alone, then (with_llm) the LLM alone and both at once."""
    server = _server(opts, max_batch_size, log)
    endpoint = Endpoint("127.0.0.1", opts.port, "/v1")
    try:
        server.wait_ready()
        llm, model = _served(opts.port)
        warm_s = min(3.0, opts.duration_s)  # first requests build per-shape plans: not measured
        asyncio.run(embedding_clients(endpoint, model, opts.clients, warm_s))
        if with_llm and opts.llm_streams:
            asyncio.run(llm_streams(endpoint, llm, opts.llm_streams, opts.output_len, warm_s))
        before = _batch_sizes(opts.port, model)
        out = {"embeddings_alone": asyncio.run(embedding_clients(endpoint, model, opts.clients, opts.duration_s))}
        after = _batch_sizes(opts.port, model)
        out["embeddings_alone"] = out["embeddings_alone"].summary()
        batches, inputs = after["batches"] - before["batches"], after["inputs"] - before["inputs"]
        out["embeddings_alone"]["mean_batch_size"] = round(inputs / batches, 2) if batches else None
        print(f"[bench embeddings] bs{max_batch_size} alone: {json.dumps(out['embeddings_alone'])}", file=sys.stderr)
        if with_llm and opts.llm_streams:
            args = (opts.llm_streams, opts.output_len, opts.duration_s)
            out["llm_alone"] = asyncio.run(llm_streams(endpoint, llm, *args)).summary()

            async def both():
                return await asyncio.gather(
                    llm_streams(endpoint, llm, *args), embedding_clients(endpoint, model, opts.clients, opts.duration_s)
                )

            mixed_llm, mixed_emb = asyncio.run(both())
            out["mixed"] = {"llm": mixed_llm.summary(), "embeddings": mixed_emb.summary()}
            print(f"[bench embeddings] llm alone: {json.dumps(out['llm_alone'])}", file=sys.stderr)
            print(f"[bench embeddings] mixed: {json.dumps(out['mixed'])}", file=sys.stderr)
        out["models"] = {"llm": llm, "embedding": model}
        return out
    finally:
        server.stop()


def main(opts: EmbeddingBenchOptions) -> int:
    results = Path(opts.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    batched = run_server(opts, opts.max_batch_size, True, results / f"embeddings-{stamp}-batched.log")
    single = run_server(opts, 1, False, results / f"embeddings-{stamp}-bs1.log")
    b, s = batched["embeddings_alone"], single["embeddings_alone"]
    speedup = (
        round(b["requests_per_s"] / s["requests_per_s"], 2) if b["requests_per_s"] and s["requests_per_s"] else None
    )
    report = {
        "command": "ladle bench embeddings",
        "options": asdict(opts),
        "load_average_before": load_before,
        "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "batched": batched,
        "batch_size_1": single,
        "throughput_batched_over_bs1": speedup,
    }
    path = results / f"embeddings-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({"throughput_batched_over_bs1": speedup, "batched": b, "batch_size_1": s}))
    if _plot(results / f"embeddings-{stamp}.png", report):
        print(f"plot: {results / f'embeddings-{stamp}.png'}")
    print(f"saved {path}")
    return 0


def _plot(path: Path, report: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batched, single = report["batched"], report["batch_size_1"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = [f"batching (max {report['options']['max_batch_size']})", "batch size 1"]
    runs = [batched["embeddings_alone"], single["embeddings_alone"]]
    axes[0].bar(labels, [r["requests_per_s"] or 0 for r in runs], color=["tab:blue", "tab:gray"])
    axes[0].set_ylabel("embedding requests/s")
    axes[0].set_title(f"{report['options']['clients']} clients, one sentence each ({report['options']['runtime']})")
    width = 0.35
    for i, p in enumerate(("p50", "p99")):
        axes[1].bar([x + i * width for x in range(2)], [r["latency_ms"][p] or 0 for r in runs], width, label=p)
    axes[1].set_xticks([x + width / 2 for x in range(2)], labels)
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    axes[1].set_title("embedding latency")
    if "mixed" in batched:
        alone_e, mixed_e = batched["embeddings_alone"], batched["mixed"]["embeddings"]
        alone_l, mixed_l = batched["llm_alone"], batched["mixed"]["llm"]
        ratios = [
            (mixed_e["requests_per_s"] or 0) / (alone_e["requests_per_s"] or 1),
            (mixed_l.get("tokens_per_s") or 0) / (alone_l.get("tokens_per_s") or 1),
        ]
        axes[2].bar(["embeddings req/s", "LLM tokens/s"], ratios, color=["tab:blue", "tab:orange"])
        axes[2].axhline(1.0, color="gray", linestyle="--")
        axes[2].set_ylabel("under mixed load / alone")
        axes[2].set_title("both at once: neither starves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
