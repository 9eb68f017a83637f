"""`ladle bench throughput`: offline batch throughput, optionally against transformers' generate().

Random token prompts of a fixed length, a fixed number of output tokens (EOS ignored), all
submitted at once to Ladle; the baseline runs the same prompts through Hugging Face
`generate()` one request at a time, the way a user would without a server.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ladle.errors import LadleError


@dataclass
class ThroughputResult:
    system: str  # "ladle" or "hf"
    num_prompts: int
    input_len: int
    output_len: int
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float


def random_prompts(vocab_size: int, special_ids: set[int], num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [i for i in range(vocab_size) if i not in special_ids]
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(num)]


def _result(system, prompts, output_len, elapsed) -> ThroughputResult:
    n = len(prompts)
    out = n * output_len
    total = out + sum(len(p) for p in prompts)
    return ThroughputResult(
        system, n, len(prompts[0]), output_len, elapsed, n / elapsed, out / elapsed, total / elapsed
    )


def run_ladle(llm, prompts: list[list[int]], output_len: int) -> ThroughputResult:
    from ladle.sample.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm up
    llm.engine.reset_prefix_cache()
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    if any(len(r.token_ids) != output_len for r in results):
        raise RuntimeError("a request ended early despite ignore_eos")
    return _result("ladle", prompts, output_len, elapsed)


def run_hf(source, dtype, prompts: list[list[int]], output_len: int) -> ThroughputResult:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise LadleError("--baseline hf needs transformers: run `make install-test`") from None
    if source.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    model.eval()

    def one(ids, n):
        with torch.no_grad():
            x = torch.tensor([ids])
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == len(ids) + n

    one(prompts[0], 2)  # warm up
    start = time.perf_counter()
    for ids in prompts:
        one(ids, output_len)
    return _result("hf", prompts, output_len, time.perf_counter() - start)


def main(args, config) -> int:
    """`config`: the EngineConfig of the command's flags (quantization, scheduling, speculation...)."""
    import torch

    from ladle.engine.llm import LLM

    llm = LLM(config=config)
    dtype = llm.engine.executor.loaded.dtype
    weights = llm.engine.info.weights_description  # e.g. "int8 weights, float32 activations"
    tok = llm.tokenizer
    specials = set(tok.stop_token_ids) | {i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None}
    prompts = random_prompts(tok.vocab_size, specials, args.num_prompts, args.input_len, args.seed)
    results = [run_ladle(llm, prompts, args.output_len)]
    _print(results[0], torch.get_num_threads(), weights)
    if args.baseline == "hf":
        subset = prompts[: args.baseline_num_prompts or len(prompts)]
        del llm
        results.append(run_hf(_source(args), dtype, subset, args.output_len))
        _print(results[1], torch.get_num_threads(), str(dtype))
        ratio = results[0].output_tokens_per_s / results[1].output_tokens_per_s
        print(f"ladle / hf output tokens/s: {ratio:.1f}x")
    _save(args, results, weights)
    return 0


def _source(args):
    from ladle.model.source import resolve_model

    return resolve_model(args.model)


def _print(r: ThroughputResult, threads: int, dtype: str) -> None:
    print(
        f"[{r.system}] {r.num_prompts} prompts x ({r.input_len} in, {r.output_len} out), {dtype}, "
        f"{threads} threads: {r.elapsed_s:.1f} s, {r.requests_per_s:.2f} req/s, "
        f"{r.output_tokens_per_s:.1f} output tok/s, {r.total_tokens_per_s:.1f} total tok/s"
    )


def _save(args, results, dtype) -> None:
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"throughput-{stamp}.json"
    payload = {
        "command": "ladle bench throughput",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "dtype": dtype,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"saved {path}")
