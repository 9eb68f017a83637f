"""`ladle convert`: a GGUF file written as a Hugging Face folder serves the same logits, in Ladle
and in transformers, and peers get the tokenizer and chat template too."""

from __future__ import annotations

import json

import pytest
import torch
from test_reference_logits import ladle_all_logits, prompt_ids

from helpers import run_ladle
from ladle.model.loader import load_model
from ladle.model.source import resolve_model
from ladle.runner.model_runner import StepChunk


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_gguf_gives_the_same_logits(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = tiny_models[arch]
    out = tmp_path / "hf"
    result = run_ladle("convert", "--model", str(tiny.gguf_path), "--output", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    ids = prompt_ids(21, seed=3, vocab=tiny.config.vocab_size)
    chunk = [StepChunk(ids, 0, list(range(6)))]

    def logits(path):
        return ladle_all_logits(load_model(resolve_model(str(path)), dtype="float32", device="cpu"), chunk)[0]

    from_gguf, from_folder = logits(tiny.gguf_path), logits(out)
    torch.testing.assert_close(from_folder, from_gguf, atol=0, rtol=0)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(from_gguf, ref, atol=1e-4, rtol=0)

    hf_tok = AutoTokenizer.from_pretrained(out)
    ladle_tok = load_model(resolve_model(str(out)), dtype="float32", device="cpu").tokenizer
    text = "The quick brown fox, 42 times."
    assert hf_tok(text)["input_ids"] == ladle_tok.encode(text)


def test_convert_refuses_a_folder_that_holds_a_model(tiny_models):
    tiny = tiny_models["llama"]
    result = run_ladle("convert", "--model", str(tiny.gguf_path), "-o", str(tiny.hf_dir))
    assert result.returncode == 2
    assert "already holds a model" in result.stderr


def test_converted_embedded_model_keeps_its_chat_template(tmp_path):
    out = tmp_path / "smol"
    assert run_ladle("convert", "-o", str(out)).returncode == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
