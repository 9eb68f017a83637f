"""`ladle` command line: parses arguments and wires components together; no logic of its own.

Every user error (bad path, bad flag value, bad file) ends in one line on stderr and exit code 2;
`--debug` shows the traceback too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ladle import __version__
from ladle.config import (
    QUANTIZATION_METHODS,
    RUNTIMES,
    TOOL_CALL_PARSERS,
    AdmissionConfig,
    BatchingConfig,
    CacheConfig,
    EngineConfig,
    LatencyTargets,
    MeteringConfig,
    ModelConfig,
    ModelEntry,
    SchedulerConfig,
    ServerConfig,
)
from ladle.errors import LadleError

EXIT_USER_ERROR = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="PATH",
        help="a GGUF file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--dtype",
        default=ModelConfig.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and KV-cache dtype; auto = bf16 on CUDA and on CPUs with native bf16, else float32",
    )
    g.add_argument("--device", default=ModelConfig.device, help="cpu, cuda, cuda:N, or auto (default)")
    g.add_argument(
        "--quantization",
        "-q",
        default=ModelConfig.quantization,
        choices=QUANTIZATION_METHODS,
        help="int8 per channel, int4 in groups of 64, or from-gguf (a GGUF file's Q4_0/Q4_1 blocks as "
        "exact int4, Q8_0 as int8): weight-only, the lm_head int8, fastest at low concurrency; w8a8 (CPU): "
        "int8 weights and int8 activations (per token, SmoothQuant-calibrated at load), head included, "
        "fastest at every concurrency (perplexity +1.5%% on SmolLM2-135M). The embedding stays in --dtype",
    )
    g.add_argument(
        "--calibration-cache",
        default=ModelConfig.calibration_cache,
        type=lambda value: None if value in ("", "none") else value,
        metavar="DIR",
        help="where w8a8 keeps its calibration between starts (a few seconds of every start on a small "
        "CPU); 'none' calibrates at every start",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="longest prompt + output in tokens (default: the model's context length)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from ladle.engine.llm import build_engine
    from ladle.sample.params import SamplingParams

    if args.max_tokens < 1:
        raise LadleError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise LadleError(f"--temperature must be >= 0, got {args.temperature}")
    engine = build_engine(_engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts()
    for i, prompt in enumerate(prompts):
        tok = engine.tokenizer
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if args.chat else tok.encode(prompt)
        engine.add_request(f"cli-{i}", ids, params)
        while engine.has_unfinished():
            for delta in engine.step():
                sys.stdout.write(delta.new_text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _engine_config(args: argparse.Namespace):
    from ladle.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig

    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            served_name=getattr(args, "served_model_name", None),
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
            calibration_cache=args.calibration_cache,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_gib=args.kv_cache_memory,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            policy=args.scheduling_policy,
        ),
        speculative=SpeculativeConfig(
            method=args.speculative,
            num_speculative_tokens=args.num_speculative_tokens,
            draft_model=args.draft_model,
            ngram_min=args.ngram_min,
            ngram_max=args.ngram_max,
            disable_batch_size=args.speculative_disable_batch_size,
        ),
    )


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="KV-cache budget in GiB (default: a quarter of free RAM up to 4 GiB; 85%% of free GPU memory)",
    )
    c, sc = CacheConfig(), SchedulerConfig()
    g.add_argument(
        "--block-size", type=int, default=c.block_size, metavar="N", help=f"tokens per KV block ({c.block_size})"
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prefixes")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=sc.max_num_batched_tokens,
        metavar="N",
        help="tokens computed per step across requests; longer prompts prefill in chunks "
        f"({sc.max_num_batched_tokens})",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=sc.max_num_seqs,
        metavar="N",
        help=f"requests running at once ({sc.max_num_seqs})",
    )
    from ladle.engine.policy import POLICY_NAMES

    g.add_argument(
        "--scheduling-policy",
        choices=POLICY_NAMES,
        default=sc.policy,
        help="fcfs; priority (lower value first, preempting higher values); or vtc: fair shares between "
        f"tenants by their weights, interactive before batch (docs/tenants.md) ({sc.policy})",
    )
    from ladle.config import SPECULATIVE_METHODS, SpeculativeConfig

    d = SpeculativeConfig()
    g = p.add_argument_group("speculative decoding")
    g.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        default=d.method,
        help="guess tokens and verify them in one pass: ngram (prompt lookup) or draft (--draft-model)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=d.num_speculative_tokens,
        metavar="K",
        help=f"tokens guessed per request and step ({d.num_speculative_tokens})",
    )
    g.add_argument("--draft-model", default=None, metavar="PATH", help="smaller model, same tokenizer (GGUF/HF)")
    g.add_argument(
        "--ngram-min",
        type=int,
        default=d.ngram_min,
        metavar="N",
        help=f"shortest suffix n-gram looked up ({d.ngram_min})",
    )
    g.add_argument(
        "--ngram-max",
        type=int,
        default=d.ngram_max,
        metavar="N",
        help=f"longest suffix n-gram looked up; shorter ones down to --ngram-min follow ({d.ngram_max})",
    )
    g.add_argument(
        "--speculative-disable-batch-size",
        type=int,
        default=d.disable_batch_size,
        metavar="N",
        help=f"pause speculation while more than N requests run; 0 = never ({d.disable_batch_size}, measured)",
    )


def _read_prompts():
    """Prompts from standard input, one per line (an interactive session on a terminal)."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


SERVER_FLAGS = {  # serve flag dest -> ServerConfig field: the flags that may override a config file
    "host": "host", "port": "port", "api_key": "api_keys", "admin_key": "admin_keys",
    "max_request_bytes": "max_request_bytes", "drain_timeout": "drain_timeout_s",
}  # fmt: skip
METERING_FLAGS = {  # serve flag dest -> MeteringConfig field: flags that may override a config file's `metering:`
    "database": "database", "data_dir": "data_dir", "redis": "redis", "usage_log": "usage_log",
}  # fmt: skip


def _add_metering_args(srv: argparse.ArgumentParser) -> None:
    m = MeteringConfig()
    g = srv.add_argument_group("tenants, usage ledger and quotas (docs/tenants.md)")
    g.add_argument(
        "--database",
        default=m.database,
        metavar="URL",
        help="where tenants, keys and usage rows live: sqlite:///FILE or postgresql://USER@HOST/DB "
        "(default: DATA_DIR/ladle.db)",
    )
    g.add_argument(
        "--data-dir", default=m.data_dir, metavar="DIR", help=f"folder of the default SQLite database ({m.data_dir})"
    )
    g.add_argument("--no-ledger", action="store_true", help="write no usage rows (tenants and keys still persist)")
    g.add_argument(
        "--redis",
        default=m.redis,
        metavar="URL",
        help="keep the tenants' quota counters in this Redis (redis://HOST:PORT/DB), shared by every replica "
        "given the same URL, so N replicas enforce a limit once (default: in this process)",
    )
    g.add_argument(
        "--usage-log",
        default=m.usage_log,
        metavar="FILE",
        help="also append each request's usage row (tenant, models, tokens, timings, status, outcome, cost) to "
        "FILE as one JSON line, flushed per row, like an access log",
    )
    g.add_argument(
        "--share-prefix-cache",
        action="store_true",
        help="let tenants reuse each other's prefix-cache blocks (else salted per tenant, so none can time another's)",
    )


def _metering_config(args: argparse.Namespace, base: MeteringConfig, defaults: dict) -> MeteringConfig:
    """base, with the metering flags given."""
    given = {field: value for dest, field in METERING_FLAGS.items() if (value := getattr(args, dest)) != defaults[dest]}
    return dataclasses.replace(
        base,
        ledger=base.ledger and not args.no_ledger,
        share_prefix_cache=base.share_prefix_cache or args.share_prefix_cache,
        **given,
    )


def _add_serve_args(srv: argparse.ArgumentParser) -> None:
    d, e, a = ServerConfig(), ModelEntry(name="-"), AdmissionConfig()
    g = srv.add_argument_group("server")
    g.add_argument("--host", default=d.host, help=f"address to bind ({d.host})")
    g.add_argument("--port", type=int, default=d.port, help=f"port ({d.port})")
    g.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name clients use (default: from the file or folder)",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this bearer token (repeatable); without one, no authentication",
    )
    g.add_argument(
        "--admin-key",
        action="append",
        default=[],
        metavar="KEY",
        help="bearer token of the admin API (/admin/models, /admin/tenants, /admin/keys; repeatable); "
        "without one, no admin API",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        metavar="N",
        help=f"larger request bodies get 413 ({d.max_request_bytes // (1 << 20)} MiB)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        metavar="S",
        help=f"on SIGTERM, seconds in-flight requests may still run before they are aborted ({d.drain_timeout_s:g})",
    )
    g.add_argument(
        "--tool-call-parser",
        default=e.tool_call_parser,
        choices=TOOL_CALL_PARSERS,
        help="how the model writes tool calls (auto: from its chat template; hermes where it shows none)",
    )
    g.add_argument(
        "--model-repository",
        default=None,
        metavar="DIR",
        help="also serve the tensor (ONNX) models of this folder over KServe v2 (docs/model-repository.md); "
        "without --model, only those",
    )
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up passes before /ready")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    b = BatchingConfig()
    g = srv.add_argument_group("embedding model (served beside the LLM; its requests are dynamically batched)")
    g.add_argument(
        "--embedding-model",
        default=None,
        metavar="PATH",
        help="a sentence-transformers folder (default: the embedded all-MiniLM-L6-v2)",
    )
    g.add_argument("--no-embedding-model", action="store_true", help="serve the LLM alone")
    g.add_argument(
        "--embedding-max-batch-size",
        type=int,
        default=b.max_batch_size,
        metavar="N",
        help=f"inputs per batch at most ({b.max_batch_size})",
    )
    g.add_argument(
        "--embedding-max-queue-delay-ms",
        type=float,
        default=b.max_queue_delay_ms,
        metavar="MS",
        help=f"how long a batch's first input waits for others ({b.max_queue_delay_ms:g} ms)",
    )
    g.add_argument(
        "--embedding-runtime",
        default=ModelConfig.runtime,
        choices=RUNTIMES,
        help="torch: Ladle's encoder; onnxruntime: the encoder exported to ONNX at load and run by ONNX Runtime",
    )
    g = srv.add_argument_group("admission")
    g.add_argument("--ttft-target-ms", type=float, default=None, metavar="MS", help="P95 time-to-first-token target")
    g.add_argument("--tpot-target-ms", type=float, default=None, metavar="MS", help="P95 time-per-output-token target")
    g.add_argument(
        "--max-queue-wait",
        type=float,
        default=a.max_queue_wait_s,
        metavar="S",
        help=f"without a TTFT target: refuse (429) a request predicted to wait longer ({a.max_queue_wait_s:g} s)",
    )
    g.add_argument(
        "--queue-timeout",
        type=float,
        default=a.queue_timeout_s,
        metavar="S",
        help="drop a request still queued after S seconds, with an error (default: never)",
    )
    g.add_argument(
        "--no-admission",
        action="store_true",
        help="queue every valid request (up to the queue bounds) whatever its predicted latency; with --config too",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=e.max_waiting_requests,
        metavar="N",
        help=f"requests queued beyond this get 429 with Retry-After ({e.max_waiting_requests})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladle", description="Ladle: an LLM inference server with an OpenAI-compatible API."
    )
    parser.add_argument("--version", action="version", version=f"ladle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete a prompt offline and print the text as it comes")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read prompts from stdin)")
    _add_model_args(gen)
    _add_engine_args(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        description="Serve one model given by flags, or the models of a config file (--config).",
    )
    srv.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a YAML file declaring the models, router and server (examples/ladle.yaml); server flags given "
        "beside it override the file's",
    )
    _add_model_args(srv)
    _add_engine_args(srv)
    _add_serve_args(srv)
    _add_metering_args(srv)
    srv.set_defaults(func=_cmd_serve)

    conv = sub.add_parser("convert", help="write a model (GGUF or HF folder) as a plain Hugging Face folder")
    conv.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="PATH",
        help="a GGUF file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    conv.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to create")
    conv.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="weight dtype (bfloat16)"
    )
    conv.set_defaults(func=_cmd_convert)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval", metavar="EVAL", required=True)
    ppl = ev.add_parser("perplexity", help="perplexity of the model on a text (default: the one shipped with Ladle)")
    _add_model_args(ppl)
    ppl.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text to score (default: ladle_eval.txt)")
    ppl.add_argument("--context", type=int, default=1024, metavar="N", help="tokens per scored window (1024)")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.set_defaults(func=_cmd_eval_perplexity)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", metavar="BENCH", required=True)
    tp = bench.add_parser("throughput", help="offline batch throughput, optionally against transformers")
    _add_model_args(tp)
    _add_engine_args(tp)
    tp.add_argument("--num-prompts", type=int, default=64, metavar="N")
    tp.add_argument("--input-len", type=int, default=256, metavar="N", help="prompt tokens (random ids)")
    tp.add_argument("--output-len", type=int, default=128, metavar="N", help="generated tokens (EOS ignored)")
    tp.add_argument(
        "--baseline",
        choices=["none", "hf"],
        default="none",
        help="hf: the same prompts through transformers generate(), one at a time",
    )
    tp.add_argument(
        "--baseline-num-prompts",
        type=int,
        default=None,
        metavar="N",
        help="run the baseline on the first N prompts only (its rate does not depend on N)",
    )
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--results-dir", default="benchmarks/results", metavar="DIR")
    tp.set_defaults(func=_cmd_bench_throughput)

    from ladle.bench.serve import DATASETS, ServeBenchOptions

    d = ServeBenchOptions()
    bs = bench.add_parser("serve", help="load an OpenAI-compatible server (Ladle or a peer) and report latency")
    bs.add_argument("--base-url", default=d.base_url, help="the server's OpenAI base URL")
    bs.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="PATH",
        help="the model the server runs, for its tokenizer and name (default: the embedded one)",
    )
    bs.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME[,NAME...]",
        help="model name to send, if different; several, comma-separated, take requests in turn and are reported each",
    )
    bs.add_argument("--api-key", default=None)
    bs.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="random token ids; shared-prefix; chat (mixed lengths); editing (repeat a code file of --input-len)",
    )
    bs.add_argument("--num-prompts", type=int, default=d.num_prompts, metavar="N", help=f"({d.num_prompts})")
    bs.add_argument(
        "--input-len", type=int, default=d.input_len, metavar="N", help=f"prompt tokens, mean for chat ({d.input_len})"
    )
    bs.add_argument(
        "--output-len",
        type=int,
        default=d.output_len,
        metavar="N",
        help=f"output tokens, mean for chat ({d.output_len})",
    )
    bs.add_argument(
        "--prefix-len",
        type=int,
        default=d.prefix_len,
        metavar="N",
        help=f"shared-prefix: shared tokens ({d.prefix_len})",
    )
    bs.add_argument(
        "--range-ratio",
        type=float,
        default=d.range_ratio,
        metavar="R",
        help="spread lengths uniformly by +-R (random, shared-prefix)",
    )
    bs.add_argument(
        "--concurrency",
        type=int,
        default=d.concurrency,
        metavar="N",
        help=f"requests in flight at most ({d.concurrency})",
    )
    bs.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="R",
        help="Poisson arrivals per second instead of a fixed concurrency",
    )
    bs.add_argument(
        "--sweep",
        default=None,
        metavar="A,B,...",
        help="run at each of these concurrencies (or rates, with --request-rate) and plot",
    )
    bs.add_argument("--goodput", default=None, metavar="SLO", help="latency targets, e.g. ttft:2000,tpot:100 (ms)")
    bs.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    bs.add_argument("--warmup", type=int, default=d.warmup, metavar="N", help=f"short requests sent first ({d.warmup})")
    bs.add_argument("--seed", type=int, default=d.seed)
    bs.add_argument("--label", default=d.label, help="name of the system under test, for files and output")
    bs.add_argument("--results-dir", default=d.results_dir, metavar="DIR")
    bs.set_defaults(func=_cmd_bench_serve)

    cmp = bench.add_parser(
        "compare", help="Ladle and peer servers (vLLM-CPU, other Ladle settings) on the same workloads, one table"
    )
    cmp.add_argument("--model", "-m", default=None, metavar="PATH", help="model for every system (default: embedded)")
    cmp.add_argument(
        "--peers", default="vllm", help="comma-separated: vllm, ladle:ARGS, ladle@CHECKOUT:ARGS (default: vllm)"
    )
    cmp.add_argument("--rounds", type=int, default=1, metavar="N", help="run each system N times in turn (1)")
    cmp.add_argument("--workloads", default="c32,c1", help="comma-separated: c32, c1, prefix (default: c32,c1)")
    cmp.add_argument("--ladle-args", default="", metavar="ARGS", help="extra `ladle serve` flags for Ladle itself")
    cmp.add_argument("--vllm-venv", default="~/.cache/ladle/vllm-venv", metavar="DIR", help="vLLM-CPU's venv")
    cmp.add_argument("--install-vllm", action="store_true", help="create --vllm-venv first (about 3.4 GB)")
    cmp.add_argument("--hf-cache", default="~/.cache/ladle/hf", metavar="DIR", help="where converted folders go")
    cmp.add_argument("--max-model-len", type=int, default=2048, metavar="N", help="vLLM's context cap (2048)")
    cmp.add_argument("--port", type=int, default=8290, help="port each server takes in turn (8290)")
    cmp.add_argument("--num-prompts", type=int, default=None, metavar="N", help="override each workload's count")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--results-dir", default="benchmarks/results", metavar="DIR")
    cmp.set_defaults(func=_cmd_bench_compare)

    st = bench.add_parser("structured", help="constrained decoding: compile time, TPOT constrained vs not, mask cost")
    _add_model_args(st)
    _add_engine_args(st)
    st.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests decoding together (8)")
    st.add_argument("--rounds", type=int, default=3, metavar="N", help="TPOT pairs to take the median of (3)")
    st.add_argument("--results-dir", default="benchmarks/results", metavar="DIR")
    st.set_defaults(func=_cmd_bench_structured)
    from ladle.bench.kserve import KServeBenchOptions

    k = KServeBenchOptions()
    bk = bench.add_parser(
        "kserve", help="concurrent clients against an ONNX classifier over KServe v2: dynamic batching vs batch 1"
    )
    bk.add_argument("--concurrency", type=int, default=k.concurrency, metavar="N", help=f"clients ({k.concurrency})")
    bk.add_argument("--duration", type=float, default=k.duration_s, metavar="S", help=f"per mode ({k.duration_s:g} s)")
    bk.add_argument("--warmup", type=float, default=k.warmup_s, metavar="S", help=f"per mode ({k.warmup_s:g} s)")
    bk.add_argument("--hidden", type=int, default=k.hidden, metavar="N", help=f"MLP hidden units ({k.hidden})")
    bk.add_argument("--num-layers", type=int, default=k.num_layers, metavar="N", help=f"({k.num_layers})")
    bk.add_argument("--max-queue-delay-ms", type=float, default=k.max_queue_delay_ms, metavar="MS")
    bk.add_argument("--port", type=int, default=k.port, help=f"({k.port})")
    bk.add_argument(
        "--cache-dir", default=k.cache_dir, metavar="DIR", help=f"where the trained model is kept ({k.cache_dir})"
    )
    bk.add_argument("--results-dir", default=k.results_dir, metavar="DIR")
    bk.add_argument(
        "--client",
        default=k.client,
        choices=["raw", "tritonclient"],
        help="raw: prepared binary requests on kept-alive sockets (cheapest for the shared cores); "
        "tritonclient: the official tritonclient.http.aio client",
    )
    bk.set_defaults(func=_cmd_bench_kserve)
    from ladle.bench.burst import BurstOptions

    d = BurstOptions(config="", model="")
    bb = bench.add_parser(
        "burst", help="a burst far above capacity against a config with a TTFT target: admission on, then off"
    )
    bb.add_argument("--config", required=True, metavar="FILE", help="the config file the servers run")
    bb.add_argument("--model", "-m", required=True, help="the model asked for (needs a ttft_ms target and degrade_to)")
    bb.add_argument("--multiple", type=float, default=d.multiple, help=f"x the small model's capacity ({d.multiple:g})")
    bb.add_argument("--duration", type=float, default=d.duration_s, metavar="S", help=f"({d.duration_s:g} s)")
    bb.add_argument("--input-len", type=int, default=d.input_len, metavar="N", help=f"({d.input_len})")
    bb.add_argument("--output-len", type=int, default=d.output_len, metavar="N", help=f"({d.output_len})")
    bb.add_argument("--retries", type=int, default=d.retries, help=f"tries after a 429's Retry-After ({d.retries})")
    bb.add_argument("--port", type=int, default=d.port, help=f"({d.port})")
    bb.add_argument("--seed", type=int, default=d.seed)
    bb.add_argument("--results-dir", default=d.results_dir, metavar="DIR")
    bb.set_defaults(func=_cmd_bench_burst)
    _add_bench_embeddings(bench)
    _add_bench_fairness(bench)
    from ladle.cli_admin import add_parsers

    add_parsers(sub)
    return parser


def _add_bench_fairness(bench) -> None:
    from ladle.bench.fairness import FairnessOptions

    d = FairnessOptions()
    bf = bench.add_parser(
        "fairness", help="two tenants (a floods, b trickles; then both backlogged) under each scheduling policy"
    )
    bf.add_argument("--model", "-m", default=None, metavar="PATH", help="default: the embedded model")
    bf.add_argument("--policies", default=",".join(d.policies), help=f"comma-separated ({','.join(d.policies)})")
    bf.add_argument("--flood", type=int, default=d.flood, metavar="N", help=f"a's requests at once ({d.flood})")
    bf.add_argument(
        "--trickle", type=int, default=d.trickle, metavar="N", help=f"b's, one per --interval ({d.trickle})"
    )
    bf.add_argument("--interval", type=float, default=d.interval_s, metavar="S", help=f"({d.interval_s:g} s)")
    bf.add_argument("--backlog", type=int, default=d.backlog, metavar="N", help=f"each tenant's, at once ({d.backlog})")
    bf.add_argument("--idle-requests", type=int, default=d.idle_requests, metavar="N", help=f"({d.idle_requests})")
    bf.add_argument("--input-len", type=int, default=d.input_len, metavar="N", help=f"({d.input_len})")
    bf.add_argument("--output-len", type=int, default=d.output_len, metavar="N", help=f"({d.output_len})")
    bf.add_argument("--weight-a", type=float, default=d.weight_a, help=f"({d.weight_a:g})")
    bf.add_argument("--weight-b", type=float, default=d.weight_b, help=f"({d.weight_b:g})")
    bf.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, metavar="N", help=f"({d.max_num_seqs})")
    bf.add_argument("--port", type=int, default=d.port, help=f"({d.port})")
    bf.add_argument("--seed", type=int, default=d.seed)
    bf.add_argument("--results-dir", default=d.results_dir, metavar="DIR")
    bf.set_defaults(func=_cmd_bench_fairness)


def _cmd_bench_fairness(args: argparse.Namespace) -> int:
    from ladle.bench.fairness import FairnessOptions, main
    from ladle.engine.policy import POLICY_NAMES

    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        raise LadleError(f"--policies: unknown {unknown} (choose from {', '.join(POLICY_NAMES)})")
    if min(args.flood, args.trickle, args.backlog, args.idle_requests, args.output_len) < 1:
        raise LadleError("--flood, --trickle, --backlog, --idle-requests and --output-len must be at least 1")
    return main(FairnessOptions(
        model=args.model, policies=policies, flood=args.flood, trickle=args.trickle, interval_s=args.interval,
        backlog=args.backlog, idle_requests=args.idle_requests, input_len=args.input_len, output_len=args.output_len,
        weight_a=args.weight_a, weight_b=args.weight_b, max_num_seqs=args.max_num_seqs, port=args.port,
        seed=args.seed, results_dir=args.results_dir,
    ))  # fmt: skip


def _add_bench_embeddings(bench) -> None:
    from ladle.bench.embeddings import EmbeddingBenchOptions

    d = EmbeddingBenchOptions()
    be = bench.add_parser(
        "embeddings", help="/v1/embeddings under many clients: dynamic batching against batch size 1, and beside an LLM"
    )
    be.add_argument("--clients", type=int, default=d.clients, metavar="N", help=f"concurrent clients ({d.clients})")
    be.add_argument("--duration", type=float, default=d.duration_s, metavar="S", help=f"per phase ({d.duration_s:g} s)")
    be.add_argument("--max-batch-size", type=int, default=d.max_batch_size, metavar="N", help=f"({d.max_batch_size})")
    be.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=d.max_queue_delay_ms,
        metavar="MS",
        help=f"({d.max_queue_delay_ms:g})",
    )
    be.add_argument(
        "--llm-streams", type=int, default=d.llm_streams, metavar="N", help=f"0 skips the LLM phases ({d.llm_streams})"
    )
    be.add_argument(
        "--output-len", type=int, default=d.output_len, metavar="N", help=f"tokens per completion ({d.output_len})"
    )
    be.add_argument("--model", "-m", default=None, metavar="PATH", help="the LLM (default: the embedded one)")
    be.add_argument("--embedding-model", default=None, metavar="PATH", help="default: the embedded all-MiniLM-L6-v2")
    be.add_argument("--embedding-runtime", default=d.runtime, choices=RUNTIMES, help=f"({d.runtime})")
    be.add_argument("--port", type=int, default=d.port, help=f"({d.port})")
    be.add_argument("--results-dir", default=d.results_dir, metavar="DIR")
    be.set_defaults(func=_cmd_bench_embeddings)


def _cmd_bench_embeddings(args: argparse.Namespace) -> int:
    from ladle.bench.embeddings import EmbeddingBenchOptions, main

    if args.clients < 1 or args.duration <= 0 or args.max_batch_size < 1 or args.llm_streams < 0:
        raise LadleError("--clients and --max-batch-size must be at least 1, --duration positive, --llm-streams >= 0")
    return main(EmbeddingBenchOptions(
        clients=args.clients, duration_s=args.duration, max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms, llm_streams=args.llm_streams, output_len=args.output_len,
        model=args.model, embedding_model=args.embedding_model, port=args.port, results_dir=args.results_dir,
        runtime=args.embedding_runtime,
    ))  # fmt: skip


def _cmd_convert(args: argparse.Namespace) -> int:
    from ladle.model.convert import convert_to_hf
    from ladle.model.source import resolve_model

    out = convert_to_hf(resolve_model(args.model), args.output, args.dtype)
    print(f"wrote {out}")
    return 0


def _cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from ladle.eval.perplexity import main as eval_main

    return eval_main(args)


def _cmd_bench_burst(args: argparse.Namespace) -> int:
    from ladle.bench.burst import BurstOptions, main

    return main(BurstOptions(
        config=args.config, model=args.model, multiple=args.multiple, duration_s=args.duration,
        input_len=args.input_len, output_len=args.output_len, retries=args.retries, port=args.port, seed=args.seed,
        results_dir=args.results_dir,
    ))  # fmt: skip


def _cmd_bench_kserve(args: argparse.Namespace) -> int:
    from ladle.bench.kserve import KServeBenchOptions, main

    opts = KServeBenchOptions(
        concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup, hidden=args.hidden,
        num_layers=args.num_layers, max_queue_delay_ms=args.max_queue_delay_ms, port=args.port,
        cache_dir=args.cache_dir, results_dir=args.results_dir, client=args.client,
    )  # fmt: skip
    return main(opts)


def _cmd_bench_structured(args: argparse.Namespace) -> int:
    from ladle.bench.structured import main

    if args.concurrency < 1 or args.rounds < 1:
        raise LadleError("--concurrency and --rounds must be at least 1")
    return main(args, _engine_config(args))


def _cmd_bench_compare(args: argparse.Namespace) -> int:
    from ladle.bench.compare import main as compare_main

    return compare_main(args)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from ladle.bench.serve import ServeBenchOptions
    from ladle.bench.serve import main as bench_main

    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise LadleError("--num-prompts, --input-len and --output-len must be at least 1")
    try:
        return bench_main(ServeBenchOptions.from_namespace(args))
    except ValueError as e:
        raise LadleError(str(e)) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from ladle.server.serve import run

    defaults = _serve_defaults()
    cfg = _config_from_file(args, defaults) if args.config else _config_from_flags(args, defaults)
    logging.getLogger("ladle").setLevel(logging.DEBUG if args.debug else getattr(logging, args.log_level.upper()))
    return run(cfg, args.log_level)


def _server_config(args: argparse.Namespace, base: ServerConfig, defaults: dict) -> ServerConfig:
    """base, with the server flags that differ from their defaults."""
    given = {
        field: tuple(value) if isinstance(value, list) else value
        for dest, field in SERVER_FLAGS.items()
        if (value := getattr(args, dest)) != defaults[dest]
    }
    return dataclasses.replace(base, warmup=base.warmup and not args.no_warmup, **given)


def _config_from_flags(args: argparse.Namespace, defaults: dict):
    from ladle.config import LadleConfig
    from ladle.model.source import resolve_model

    admission = AdmissionConfig(
        enabled=not args.no_admission, max_queue_wait_s=args.max_queue_wait, queue_timeout_s=args.queue_timeout
    )
    server = _server_config(args, ServerConfig(), defaults)
    metering = _metering_config(args, MeteringConfig(), defaults)
    if args.model_repository and args.model is None:  # the repository's tensor models alone
        cfg = LadleConfig(server=server, admission=admission, metering=metering, model_repository=args.model_repository)
        return _with_tensor_models(cfg, ".", f"--model-repository {args.model_repository}")
    source = resolve_model(args.model, args.served_model_name)  # a bad path fails here, before binding
    entry = ModelEntry(
        name=source.name,
        engine=_engine_config(args),
        targets=LatencyTargets(ttft_ms=args.ttft_target_ms, tpot_ms=args.tpot_target_ms),
        max_waiting_requests=args.max_waiting_requests,
        tool_call_parser=args.tool_call_parser,
    )
    models = (entry, *_embedding_entry(args, taken=set(entry.names)))
    cfg = LadleConfig(
        models=models, server=server, admission=admission, metering=metering, model_repository=args.model_repository
    )
    return _with_tensor_models(cfg, ".", f"--model-repository {args.model_repository}")


def _with_tensor_models(cfg, base_dir, source: str):
    from ladle.router.onnx import with_tensor_models

    cfg = with_tensor_models(cfg, base_dir)
    if not cfg.models:
        raise LadleError(f"{source}: no model folders (each one holds a config.yaml and a version folder)")
    return cfg


def _embedding_entry(args: argparse.Namespace, taken: set[str]) -> tuple[ModelEntry, ...]:
    """The embedding model served beside the LLM: --embedding-model, else the embedded MiniLM
    (skipped with a warning where its package is not installed), none with --no-embedding-model."""
    from ladle.model.source import EMBEDDING_ALIASES, resolve_embedding_model

    if args.no_embedding_model:
        return ()
    try:
        source = resolve_embedding_model(args.embedding_model)
    except LadleError as e:
        if args.embedding_model is not None:
            raise
        logging.getLogger("ladle").warning("serving no embedding model: %s", e)
        return ()
    if source.name in taken:
        raise LadleError(f"--embedding-model: the name {source.name!r} is already the LLM's")
    aliases = tuple(a for a in EMBEDDING_ALIASES if a not in taken) if args.embedding_model is None else ()
    batching = BatchingConfig(
        max_batch_size=args.embedding_max_batch_size, max_queue_delay_ms=args.embedding_max_queue_delay_ms
    )
    model = ModelConfig(model=str(source.path), served_name=source.name, runtime=args.embedding_runtime)
    return (
        ModelEntry(source.name, kind="embedding", engine=EngineConfig(model=model), aliases=aliases, batching=batching),
    )


def _config_from_file(args: argparse.Namespace, defaults: dict):
    from ladle.config_file import load_config_file

    model_flags = sorted(
        f"--{dest.replace('_', '-')}"
        for dest, value in vars(args).items()
        if dest in defaults and dest not in SERVER_FLAGS and dest not in METERING_FLAGS
        and dest not in ("config", "no_warmup", "log_level", "no_admission", "model_repository", "no_ledger",
                         "share_prefix_cache")
        and value != defaults[dest]
    )  # fmt: skip
    if model_flags:
        raise LadleError(f"{', '.join(model_flags)}: with --config, give model settings in the file")
    cfg = load_config_file(args.config)
    if args.model_repository:
        cfg = dataclasses.replace(cfg, model_repository=str(Path(args.model_repository).resolve()))
    if cfg.models or cfg.model_repository:
        cfg = _with_tensor_models(cfg, Path(args.config).expanduser().parent, args.config)
    if not cfg.models:
        raise LadleError(f"{args.config}: the config declares no models (a `models:` list)")
    admission = dataclasses.replace(cfg.admission, enabled=False) if args.no_admission else cfg.admission
    return dataclasses.replace(
        cfg,
        server=_server_config(args, cfg.server, defaults),
        admission=admission,
        metering=_metering_config(args, cfg.metering, defaults),
    )


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from ladle.bench.throughput import main as bench_main

    for flag in ("num_prompts", "input_len", "output_len"):
        if getattr(args, flag) < 1:
            raise LadleError(f"--{flag.replace('_', '-')} must be at least 1")
    return bench_main(args, _engine_config(args))


def _serve_defaults() -> dict:
    """Every `serve` flag's value when none is given (the serve parser itself, not a copy of it)."""
    return vars(build_parser().parse_args(["serve"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return func(args)
    except LadleError as e:
        if args.debug:
            raise
        print(f"ladle: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
