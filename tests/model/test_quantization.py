"""Weight-only int8 / int4: both multiplication paths equal the dequantized weights' product, the
codes reconstruct the weights within half a step, and a quantized model still serves."""

from __future__ import annotations

import pytest
import torch

from helpers import run_ladle
from ladle.config import ModelConfig
from ladle.errors import LadleError
from ladle.model.loader import load_model
from ladle.model.quant import Int4Linear, Int8Linear, QuantLinear, quantize_model
from ladle.model.source import resolve_model


def make(cls, out_features=192, in_features=128, bias=False):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    return cls(w, b), w, b


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 5, QuantLinear.packed_max_rows, QuantLinear.packed_max_rows + 1, 300])
def test_both_paths_equal_the_dequantized_product(cls, rows):
    layer, _, bias = make(cls, bias=True)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    expected = x @ layer.dequantize(torch.float32).t() + bias
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)


def test_tiles_cover_every_output_channel():
    layer, _, _ = make(Int8Linear, out_features=1100)  # not a multiple of the tile
    x = torch.randn(QuantLinear.packed_max_rows + 10, layer.in_features)
    torch.testing.assert_close(layer.tiled_mm(x), x @ layer.dequantize().t(), atol=1e-4, rtol=1e-5)


def test_int8_reconstructs_within_half_a_step():
    layer, w, _ = make(Int8Linear)
    step = layer.scales.float()[:, None]
    assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_int4_reconstructs_within_half_a_step_of_its_group():
    layer, w, _ = make(Int4Linear)
    step = layer.group_scale.float().repeat_interleave(layer.group_size, dim=1)
    assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    assert layer.codes.numel() == w.numel() // 2  # two 4-bit codes a byte


def test_int4_from_exact_codes():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 128), generator=g)
    scale, low = torch.rand(64, 4, generator=g), torch.randn(64, 4, generator=g)
    layer = Int4Linear.from_codes(codes, scale, low, torch.float32, group_size=32)
    expected = codes.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    torch.testing.assert_close(layer.dequantize(), expected)
    x = torch.randn(3, 128, generator=g)
    torch.testing.assert_close(layer(x), x @ expected.t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_tiny_model_stays_close_to_the_original(tiny_models, method):
    source = resolve_model(str(tiny_models["qwen2"].hf_dir))  # qwen2: q/k/v carry a bias
    plain = load_model(source, dtype="float32", device="cpu")
    quant = load_model(source, dtype="float32", device="cpu", quantization=method)
    assert quant.quantization == method
    layer = quant.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and layer.self_attn.qkv_proj.bias is not None
    assert isinstance(layer.mlp.down_proj, QuantLinear)
    assert isinstance(quant.model.lm_head, Int8Linear)  # the head is int8 under every method
    assert not isinstance(quant.model.model.embed_tokens, QuantLinear)  # the embedding stays in the dtype
    x = torch.randn(7, plain.spec.hidden_size)
    for name in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        a = plain.model.model.layers[1].get_submodule(name)(x)
        b = quant.model.model.layers[1].get_submodule(name)(x)
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > (0.999 if method == "int8" else 0.98)


def test_quantize_model_counts_the_layers(tiny_models):
    from ladle.model.loader import _build

    loaded = load_model(resolve_model(str(tiny_models["llama"].hf_dir)), dtype="float32", device="cpu")
    fresh = _build(loaded.spec, "sdpa", 64, torch.float32, torch.device("cpu"))  # plain nn.Linear layers
    assert quantize_model(fresh, "int8") == 4 * loaded.spec.num_layers
    int8 = load_model(resolve_model(str(tiny_models["llama"].hf_dir)), dtype="float32", quantization="int8")
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 4 * loaded.spec.num_layers + 1  # + head


def test_unknown_quantization_is_refused():
    with pytest.raises(LadleError, match="unknown quantization 'int3'"):
        ModelConfig(quantization="int3")
    result = run_ladle("generate", "hi", "--quantization", "fp8")
    assert result.returncode == 2
    assert "invalid choice: 'fp8'" in result.stderr


@pytest.mark.slow
def test_embedded_model_answers_with_int8_and_int4():
    for method in ("int8", "int4"):
        result = run_ladle("generate", "What is the capital of France?", "--chat", "--max-tokens", "12", "-q", method)
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_from_gguf_keeps_q4_blocks_exactly(tiny_models, tmp_path, arch, kind):
    from tiny_models import write_quantized_gguf

    path = write_quantized_gguf(tiny_models[arch], tmp_path / f"{arch}-{kind}.gguf", kind)
    source = resolve_model(str(path))
    plain = load_model(source, dtype="float32", device="cpu", pack=False)  # blocks dequantized at load
    exact = load_model(source, dtype="float32", device="cpu", quantization="from-gguf")
    for i, layer in enumerate(exact.model.model.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            quantized = layer.get_submodule(name)
            assert isinstance(quantized, Int4Linear) and quantized.group_size == 32
            dense = plain.model.model.layers[i].get_submodule(name).weight
            torch.testing.assert_close(quantized.dequantize(), dense, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, plain.spec.hidden_size)
    a = plain.model.model.layers[0].self_attn.qkv_proj(x)
    torch.testing.assert_close(exact.model.model.layers[0].self_attn.qkv_proj(x), a, atol=1e-4, rtol=1e-4)


def test_from_gguf_maps_q8_0_to_int8_and_refuses_folders(tiny_models, tmp_path):
    from tiny_models import write_quantized_gguf

    path = write_quantized_gguf(tiny_models["llama"], tmp_path / "q8.gguf", "Q8_0")
    loaded = load_model(resolve_model(str(path)), dtype="float32", device="cpu", quantization="from-gguf")
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, Int8Linear)
    with pytest.raises(LadleError, match="from-gguf needs a GGUF model"):
        load_model(resolve_model(str(tiny_models["llama"].hf_dir)), device="cpu", quantization="from-gguf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_equals_f_linear(dtype):
    from ladle.model.packed import PackedLinear, packing_available

    if not packing_available(dtype, torch.device("cpu")):
        pytest.skip(f"Ladle keeps F.linear for {dtype} on this CPU (no native bf16, or float32 rows not independent)")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    layer = PackedLinear(w, b)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    big = torch.randn(300, 64, generator=g).to(dtype)
    for rows in (1, 7, 64, 300):
        x = big[:rows]
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), **tol)
        if dtype == torch.float32:  # packed only where a row's result does not depend on its batch
            assert torch.equal(layer(x), layer(big)[:rows])


@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g64"])
def test_ladle_decode_kernels_match_the_dequantized_weights_and_ignore_the_batch(kind):
    """Ladle's own few-rows kernels: the product with the dequantized weight, and each row's bits
    the same alone and in any batch (what the identity of batched and speculative decoding needs)."""
    from ladle.model.quant import _cpu_kernels

    if _cpu_kernels() is None:
        pytest.skip("the CPU kernels do not build here: PyTorch's packed kernels are used")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 128, generator=g)
    layer = Int8Linear(w) if kind == "int8" else Int4Linear(w, None, int(kind[-2:]))
    x = torch.randn(19, 128, generator=g)
    out = layer.packed_mm(x)
    torch.testing.assert_close(out, x @ layer.dequantize().T, atol=1e-4, rtol=1e-4)
    for rows in (1, 2, 3, 5, 8, 9, 17):
        assert torch.equal(layer.packed_mm(x[:rows]), out[:rows]), rows


def test_quantized_models_carry_an_int8_head(tiny_models):
    for method in ("int8", "int4"):
        loaded = load_model(resolve_model(str(tiny_models["llama"].hf_dir)), dtype="float32", quantization=method)
        assert isinstance(loaded.model.lm_head, Int8Linear)
        assert not isinstance(loaded.model.model.embed_tokens, QuantLinear)
