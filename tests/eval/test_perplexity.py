"""`ladle eval perplexity` scores the same tokens as the reference implementation would."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_ladle
from ladle.eval.perplexity import default_text_path, perplexity
from ladle.model.loader import load_model
from ladle.model.source import resolve_model

TEXT = "The river bends where the bank is soft. " * 12 + "def area(r):\n    return 3.14159 * r * r\n" * 5


def reference_mean_nll(tiny, ids: list[int], context: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            window = torch.tensor([ids[start : start + context]])
            if window.shape[1] < 2:
                break
            logits = model(window).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return total / count


@pytest.mark.parametrize("context", [64, 1000])
def test_perplexity_matches_transformers(tiny_models, context):
    tiny = tiny_models["llama"]
    loaded = load_model(resolve_model(str(tiny.hf_dir)), dtype="float32", device="cpu")
    result = perplexity(loaded, TEXT, context=context)
    ids = loaded.tokenizer.encode(TEXT)
    context = min(context, loaded.max_model_len)
    assert result.tokens_scored == len(ids) - math.ceil(len(ids) / context)
    assert result.windows == math.ceil(len(ids) / context)
    assert result.mean_nll == pytest.approx(reference_mean_nll(tiny, ids, context), rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


def test_cli_reports_json(tiny_models, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    model = str(tiny_models["qwen2"].gguf_path)
    result = run_ladle("eval", "perplexity", "--model", model, "--text", str(text), "--json", "-q", "int8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["quantization"] == "int8" and report["text"] == "t.txt"
    assert report["perplexity"] > 1 and report["tokens_scored"] > 100


def test_missing_text_is_a_clear_error(tmp_path):
    result = run_ladle("eval", "perplexity", "--text", str(tmp_path / "none.txt"))
    assert result.returncode == 2 and "no such text file" in result.stderr


def test_the_shipped_text_is_a_few_thousand_tokens():
    from ladle.model.loader import load_tokenizer

    text = default_text_path().read_text(encoding="utf-8")
    assert text.startswith("# Ladle evaluation text.") and "public domain" in text.splitlines()[0]
    assert 3000 < len(load_tokenizer(resolve_model(None)).encode(text)) < 8000
