"""Does a request give the same tokens alone and under load? The share of requests that do.

    .venv/bin/python benchmarks/identity.py [--forms default,bfloat16,w8a8] [--num-requests 200]

For each weight form: 200 requests (half greedy, half sampled with a seed of their own; half of
the prompts share an 80-word "system prompt", and every fifth one extends an earlier prompt, so
the prefix cache has blocks to hit) are run one at a time on an idle engine: the reference. Then
all of them are submitted at once, in a random order, through the async engine (its loop thread
batches them as they come) twice: with prefix caching on, and with a chunked-prefill budget of 32
tokens and a KV cache so small that requests are preempted and recomputed. Each run reports the
share of requests whose tokens equal their run alone (the promise: 100%), with the engine's
counters (preemptions, prefix-cache hits). The JSON result goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from pathlib import Path

from ladle.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ladle.engine.async_engine import AsyncEngine
from ladle.engine.llm import LLM, build_engine
from ladle.engine.request import GenerateRequest
from ladle.model.loader import load_model
from ladle.model.source import resolve_model
from ladle.platform import cpu_features, resolve_dtype
from ladle.runner.model_runner import KVCache, prefill_hidden_states
from ladle.sample.params import SamplingParams

WORDS = (
    "the of and to in is was for on that with as by at from his her an were which are this be or had "
    "not but river city music light stone paper garden winter market code function return value list"
).split()
FORMS = {"default": ("auto", "none"), "float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
         "w8a8": ("auto", "w8a8")}  # fmt: skip


def make_requests(n: int, max_tokens: int, seed: int = 0) -> list[tuple[str, SamplingParams]]:
    rng = random.Random(seed)
    system = " ".join(rng.choice(WORDS) for _ in range(80))
    requests = []
    for i in range(n):
        if i % 5 == 4:  # extends an earlier prompt (a follow-up turn)
            prompt = requests[rng.randrange(i)][0] + " " + " ".join(rng.choice(WORDS) for _ in range(12))
        else:
            tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 150)))
            prompt = f"{system} {tail}" if i % 2 else tail
        if i % 2:
            params = SamplingParams(
                temperature=0.8, top_p=0.95, seed=10_000 + i, max_tokens=max_tokens, ignore_eos=True
            )
        else:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        requests.append((prompt, params))
    return requests


def engine_config(prefix: bool, budget: int, kv_gib: float | None, max_model_len: int = 1024) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(device="cpu", max_model_len=max_model_len),
        cache=CacheConfig(block_size=16, kv_cache_memory_gib=kv_gib, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=64),
    )


def run_alone(loaded, requests) -> list[list[int]]:
    llm = LLM(config=engine_config(prefix=False, budget=2048, kv_gib=0.25), loaded=loaded)
    return [llm.generate(p, q)[0].token_ids for p, q in requests]


def run_together(loaded, requests, config: EngineConfig, seed: int) -> tuple[list[list[int]], dict]:
    tokenizer = loaded.tokenizer
    ids = [tokenizer.encode(p) for p, _ in requests]
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    engine = AsyncEngine.launch(lambda: build_engine(config, loaded))

    async def one(i: int) -> list[int]:
        tokens = []
        async for out in engine.generate(GenerateRequest(f"r{i}", ids[i], requests[i][1])):
            tokens += out.new_token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(one(i) for i in order))

    started = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - started
    stats = engine.engine.stats
    engine.shutdown()
    by_request = [None] * len(requests)
    for i, tokens in zip(order, results, strict=True):
        by_request[i] = tokens
    counters = {
        "elapsed_s": round(elapsed, 2),
        "num_kv_blocks": stats.num_kv_blocks,
        "num_preemptions": stats.num_preemptions,
        "prefix_hit_blocks": stats.prefix_hit_blocks,
        "num_steps": stats.num_steps,
    }
    return by_request, counters


def measure_form(name: str, args) -> dict:
    dtype, quantization = FORMS[name]
    loaded = load_model(resolve_model(args.model), dtype=dtype, device="cpu", quantization=quantization,
                        calibration_cache=ModelConfig().calibration_cache,
                        calibration_forward=prefill_hidden_states)  # fmt: skip
    requests = make_requests(args.num_requests, args.max_tokens)
    started = time.perf_counter()
    alone = run_alone(loaded, requests)
    out = {"dtype": str(loaded.dtype).removeprefix("torch."), "quantization": quantization,
           "alone_s": round(time.perf_counter() - started, 2), "runs": {}}  # fmt: skip
    # 40 blocks: two or three requests' worth, so running requests outgrow it again and again
    tight_gib = 40.5 * KVCache.bytes_per_block(loaded, 16) / 2**30
    runs = {
        "together, prefix caching on": engine_config(prefix=True, budget=2048, kv_gib=0.25),
        "together, budget 32 tokens, tight KV cache": engine_config(True, 32, tight_gib, max_model_len=512),
    }
    for i, (label, config) in enumerate(runs.items()):
        together, counters = run_together(loaded, requests, config, seed=args.seed + i)
        same = [a == b for a, b in zip(alone, together, strict=True)]
        greedy = [s for s, (_, q) in zip(same, requests, strict=True) if q.is_greedy]
        seeded = [s for s, (_, q) in zip(same, requests, strict=True) if not q.is_greedy]
        out["runs"][label] = {
            "share_identical": sum(same) / len(same),
            "share_identical_greedy": sum(greedy) / len(greedy),
            "share_identical_seeded": sum(seeded) / len(seeded),
            "differing_requests": [i for i, s in enumerate(same) if not s],
            **counters,
        }
        print(
            f"{name} ({out['dtype']}, {quantization}) {label}: {sum(same)}/{len(same)} identical {counters}", flush=True
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: the embedded model)")
    ap.add_argument("--forms", default="default,bfloat16,w8a8", help=f"comma-separated: {', '.join(FORMS)}")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    f = cpu_features()
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "avx512f": f.avx512f,
                    "avx512_bf16": f.avx512_bf16, "avx512_vnni": f.avx512_vnni, "amx_bf16": f.amx_bf16},
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "forms": {},
    }  # fmt: skip
    measured = {}  # (dtype, quantization) -> the form that measured it
    for name in args.forms.split(","):
        dtype, quantization = FORMS[name]
        key = (str(resolve_dtype(dtype, "cpu")), quantization)
        if key in measured:  # e.g. bfloat16 where it is the default
            result["forms"][name] = {"same_as": measured[key]}
            print(f"{name}: the same weights as {measured[key]} on this machine")
            continue
        measured[key] = name
        result["forms"][name] = measure_form(name, args)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"identity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
