"""The compiled decode step (ladle.model.decode_plan) gives the modules' numbers, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ladle.model.attention import PagedCPUBackend
from ladle.model.loader import load_model
from ladle.model.source import resolve_model
from ladle.runner.model_runner import ModelRunner, StepChunk, prefill_hidden_states

pytestmark = pytest.mark.skipif(not PagedCPUBackend.available(), reason="Ladle's CPU kernels do not build here")


def run_steps(runner: ModelRunner, prompts: list[list[int]], decode_steps: int) -> list[torch.Tensor]:
    """A prefill of every prompt, then greedy decode steps of all of them together (a request
    leaves after `len(prompt)` steps, so batches shrink); each step's logits."""
    tables = {i: list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))}  # 8 blocks of 16 each
    seqs = [list(p) for p in prompts]
    live = list(range(len(prompts)))
    steps = [runner.execute([StepChunk(seqs[i], 0, tables[i]) for i in live])]
    for t in range(decode_steps):
        for i, token in zip(live, steps[-1].argmax(-1).tolist(), strict=True):
            seqs[i].append(token)
        live = [i for i in live if len(prompts[i]) > t]
        steps.append(runner.execute([StepChunk(seqs[i][-1:], len(seqs[i]) - 1, tables[i]) for i in live]))
    return steps


@pytest.mark.parametrize(
    "arch,dtype,quantization",
    [
        ("llama", "float32", "none"),
        ("qwen2", "float32", "none"),  # q/k/v biases
        ("llama-untied-llama3rope", "bfloat16", "none"),
        ("qwen2", "float32", "w8a8"),
        ("llama", "float32", "int8"),
        ("mistral", "float32", "w8a8"),
    ],
)
def test_decode_plan_equals_the_modules(tiny_models, arch, dtype, quantization):
    source = resolve_model(str(tiny_models[arch].hf_dir))
    loaded = load_model(
        source, dtype=dtype, device="cpu", attention_backend="cpu", quantization=quantization,
        calibration_forward=prefill_hidden_states,
    )  # fmt: skip
    fused = ModelRunner(loaded, num_blocks=64, block_size=16)
    modules = ModelRunner(loaded, num_blocks=64, block_size=16)
    modules.decode_plan = None
    assert fused.decode_plan is not None and fused.decode_plan.plan.num_layers == loaded.spec.num_layers
    prompts = [[(5 * i + 7 * j) % 300 + 3 for j in range(4 + 9 * i)] for i in range(4)]
    for a, b in zip(run_steps(fused, prompts, 12), run_steps(modules, prompts, 12), strict=True):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(fused.kv_cache.layers, modules.kv_cache.layers, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)  # the plan wrote the same cache slots


def test_forms_without_a_compiled_step_keep_the_modules(tiny_models):
    source = resolve_model(str(tiny_models["llama"].hf_dir))
    int4 = load_model(source, dtype="float32", device="cpu", attention_backend="cpu", quantization="int4")
    assert ModelRunner(int4, num_blocks=16).decode_plan is None
    sdpa = load_model(source, dtype="float32", device="cpu", attention_backend="sdpa")
    runner = ModelRunner(sdpa, num_blocks=16)
    assert runner.decode_plan is None
    logits = runner.execute([StepChunk([5, 6, 7], 0, [0])])
    assert logits.shape == (1, sdpa.spec.vocab_size)
