"""`ladle eval perplexity`: how well a model (in a given dtype and quantization) predicts a text.

The text is cut into windows of `context` tokens that do not overlap; each window is one prefill
through the same runner and paged KV cache that serve requests, with logits kept for every
position; every token but the first of a window is scored. Perplexity = exp(mean negative
log-likelihood). The default text ships with Ladle (`ladle/eval/data/ladle_eval.txt`: prose, a
story and Python code written for the project and dedicated to the public domain).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from ladle.errors import LadleError

LOGIT_ROWS = 256  # logits are computed this many positions at a time (vocab-wide rows are large)


@dataclass
class PerplexityResult:
    model: str
    dtype: str
    quantization: str
    text: str
    tokens_scored: int
    windows: int
    context: int
    mean_nll: float
    perplexity: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def default_text_path() -> Path:
    return Path(str(resources.files("ladle.eval") / "data" / "ladle_eval.txt"))


def window_nll(runner, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(ids[i] | ids[:i]) for i >= 1, and how many tokens that is."""
    from ladle.runner.model_runner import StepChunk

    blocks = list(range(-(-len(ids) // runner.block_size)))
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare([StepChunk(ids, 0, blocks)])
        hidden = runner.model(input_ids, positions, runner.kv_cache.layers, meta)
        targets = input_ids[1:]
        total = 0.0
        for start in range(0, len(ids) - 1, LOGIT_ROWS):
            end = min(start + LOGIT_ROWS, len(ids) - 1)
            logits = runner.model.compute_logits(hidden[start:end])
            total += torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="sum").item()
    return total, len(ids) - 1


def perplexity(loaded, text: str, context: int = 1024, text_name: str = "") -> PerplexityResult:
    from ladle.runner.model_runner import ModelRunner

    if context < 2:
        raise LadleError(f"--context must be at least 2, got {context}")
    context = min(context, loaded.max_model_len)
    ids = loaded.tokenizer.encode(text)
    if len(ids) < 2:
        raise LadleError("the text is too short to score (fewer than 2 tokens)")
    runner = ModelRunner(loaded, num_blocks=-(-context // 16), block_size=16)
    started = time.perf_counter()
    nll, count, windows = 0.0, 0, 0
    for start in range(0, len(ids), context):
        window = ids[start : start + context]
        if len(window) < 2:
            break
        w_nll, w_count = window_nll(runner, window)
        nll, count, windows = nll + w_nll, count + w_count, windows + 1
    mean = nll / count
    return PerplexityResult(
        model=loaded.source.name,
        dtype=str(loaded.dtype).removeprefix("torch."),
        quantization=loaded.quantization,
        text=text_name,
        tokens_scored=count,
        windows=windows,
        context=context,
        mean_nll=mean,
        perplexity=math.exp(mean),
        seconds=time.perf_counter() - started,
    )


def main(args) -> int:
    import json

    from ladle.model.loader import load_model
    from ladle.model.source import resolve_model
    from ladle.runner.model_runner import prefill_hidden_states

    path = Path(args.text) if args.text else default_text_path()
    if not path.is_file():
        raise LadleError(f"{path}: no such text file")
    loaded = load_model(
        resolve_model(args.model),
        args.dtype,
        args.device,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        calibration_cache=args.calibration_cache,
        calibration_forward=prefill_hidden_states,
    )
    result = perplexity(loaded, path.read_text(encoding="utf-8"), args.context, path.name)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(
            f"{result.model} ({result.dtype}, quantization {result.quantization}) on {result.text}: "
            f"perplexity {result.perplexity:.3f} over {result.tokens_scored} tokens "
            f"({result.windows} windows of {result.context}) in {result.seconds:.1f} s"
        )
    return 0
