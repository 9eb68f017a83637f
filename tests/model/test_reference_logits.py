"""Ladle's models against the reference implementation (Hugging Face transformers), in float32."""

from __future__ import annotations

import pytest
import torch

from ladle.model.loader import load_model
from ladle.model.source import resolve_model
from ladle.runner.model_runner import ModelRunner, StepChunk

ATOL = 1e-4
ARCH_NAMES = ["llama", "llama-untied-llama3rope", "mistral", "qwen2"]


def reference_logits(tiny, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] logits of transformers' own model from the safetensors folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def ladle_all_logits(loaded, chunks: list[StepChunk], num_blocks: int = 64) -> torch.Tensor:
    """Logits of every token of the step (the engine asks only for the last; the test asks for all)."""
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=4)
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare(chunks)
        hidden = loaded.model(input_ids, positions, runner.kv_cache.layers, meta)
        return loaded.model.compute_logits(hidden), runner


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_prefill_logits_match_transformers(tiny_models, arch, fmt):
    tiny = tiny_models[arch]
    path = tiny.hf_dir if fmt == "hf" else tiny.gguf_path
    loaded = load_model(resolve_model(str(path)), dtype="float32", device="cpu")
    ids = prompt_ids(37, seed=1, vocab=tiny.config.vocab_size)
    logits, _ = ladle_all_logits(loaded, [StepChunk(ids, 0, list(range(10)))])
    ref = reference_logits(tiny, ids)
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gguf_logits_match_transformers_gguf_loader(tiny_models, arch):
    """The same GGUF file read by transformers' own GGUF loader (llama3 rope factors aside: it
    ignores `rope_freqs`, so that model is compared against its safetensors twin above)."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_models[arch]
    if "llama3rope" in arch:
        pytest.skip("transformers' GGUF loader does not apply rope_freqs; covered by the safetensors twin")
    ref_model = AutoModelForCausalLM.from_pretrained(
        tiny.gguf_path.parent, gguf_file=tiny.gguf_path.name, dtype=torch.float32
    ).eval()
    loaded = load_model(resolve_model(str(tiny.gguf_path)), dtype="float32", device="cpu")
    ids = prompt_ids(29, seed=2, vocab=tiny.config.vocab_size)
    logits, _ = ladle_all_logits(loaded, [StepChunk(ids, 0, list(range(8)))])
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_varlen_batch_of_prefills_and_decodes_matches_transformers(tiny_models, arch):
    """One forward over a flat batch mixing a cached-prefix chunk, a fresh prompt and decodes
    gives each request the logits the reference computes for that request alone."""
    tiny = tiny_models[arch]
    loaded = load_model(resolve_model(str(tiny.hf_dir)), dtype="float32", device="cpu")
    vocab = tiny.config.vocab_size
    a, b, c = prompt_ids(23, 3, vocab), prompt_ids(11, 4, vocab), prompt_ids(9, 5, vocab)
    runner = ModelRunner(loaded, num_blocks=64, block_size=4)
    tables = {"a": list(range(0, 10)), "b": list(range(10, 20)), "c": list(range(20, 30))}
    # step 1: the first 15 tokens of a (one chunk) and all of c but its last token
    runner.execute([StepChunk(a[:15], 0, tables["a"]), StepChunk(c[:-1], 0, tables["c"])])
    # step 2: the rest of a (on top of its cached prefix), all of b, and c's last token as a decode
    logits = runner.execute(
        [StepChunk(a[15:], 15, tables["a"]), StepChunk(b, 0, tables["b"]), StepChunk(c[-1:], 8, tables["c"])]
    )
    for row, ids in enumerate([a, b, c]):
        torch.testing.assert_close(logits[row], reference_logits(tiny, ids)[-1], atol=ATOL, rtol=0)


def test_decode_steps_match_full_forward(tiny_models):
    """Token-by-token decoding through the paged cache equals one full forward of the reference."""
    tiny = tiny_models["llama"]
    loaded = load_model(resolve_model(str(tiny.gguf_path)), dtype="float32", device="cpu")
    ids = prompt_ids(30, 6, tiny.config.vocab_size)
    ref = reference_logits(tiny, ids)
    runner = ModelRunner(loaded, num_blocks=16, block_size=4)
    table = list(range(16))
    runner.execute([StepChunk(ids[:10], 0, table)])
    for p in range(10, 30):
        logits = runner.execute([StepChunk([ids[p]], p, table)])
        torch.testing.assert_close(logits[0], ref[p], atol=ATOL, rtol=0)


def test_logits_only_for_rows_that_sample(tiny_models):
    tiny = tiny_models["llama"]
    loaded = load_model(resolve_model(str(tiny.hf_dir)), dtype="float32", device="cpu")
    runner = ModelRunner(loaded, num_blocks=32, block_size=4)
    ids = prompt_ids(12, 7, tiny.config.vocab_size)
    out = runner.execute([StepChunk(ids, 0, list(range(4)), num_logits=0), StepChunk(ids[:5], 0, list(range(4, 8)))])
    assert out.shape == (1, tiny.config.vocab_size)


def test_tied_embeddings_share_storage(tiny_models):
    # (unpacked: a oneDNN-reordered lm_head is a second copy by design, see ladle.model.packed)
    loaded = load_model(resolve_model(str(tiny_models["llama"].gguf_path)), dtype="float32", device="cpu", pack=False)
    m = loaded.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    untied = load_model(resolve_model(str(tiny_models["mistral"].hf_dir)), dtype="float32", device="cpu", pack=False)
    assert untied.model.lm_head.weight.data_ptr() != untied.model.model.embed_tokens.weight.data_ptr()


def test_mistral_sliding_window_caps_the_context(tiny_models):
    loaded = load_model(resolve_model(str(tiny_models["mistral"].hf_dir)), dtype="float32", device="cpu")
    assert loaded.max_model_len == 256  # the window; within it attention is exact


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_stays_close(tiny_models, dtype):
    tiny = tiny_models["llama"]
    loaded = load_model(resolve_model(str(tiny.hf_dir)), dtype=dtype, device="cpu")
    assert loaded.dtype == getattr(torch, dtype)
    assert all(p.dtype == loaded.dtype for p in loaded.model.parameters())
    ids = prompt_ids(16, 8, tiny.config.vocab_size)
    logits, _ = ladle_all_logits(loaded, [StepChunk(ids, 0, list(range(4)))])
    ref = reference_logits(tiny, ids)
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()
