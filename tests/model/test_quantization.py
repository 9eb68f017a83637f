"""Weight-only int8 / int4: both multiplication paths equal the dequantized weights' product, the
codes reconstruct the weights within half a step, and a quantized model still serves."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_ladle
from ladle.config import ModelConfig
from ladle.errors import LadleError
from ladle.model.loader import load_model
from ladle.model.quant import Int4Linear, Int8Linear, QuantLinear, quantize_model
from ladle.model.source import resolve_model
from ladle.runner.model_runner import prefill_hidden_states


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
    quant = load_model(
        source, dtype="float32", device="cpu", quantization=method, calibration_forward=prefill_hidden_states
    )
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


def test_row_plan_shapes_calls_by_padding_or_by_a_ladder():
    from ladle.model.packed import RowPlan

    assert RowPlan().calls(5) == [(0, 5, 5)]
    assert RowPlan(2).calls(1) == [(0, 1, 2)] and RowPlan(2).calls(9) == [(0, 9, 9)]
    ladder = RowPlan(33, (33, 64, 96, 128))
    assert ladder.calls(1) == [(0, 1, 33)] and ladder.calls(33) == [(0, 33, 33)]
    assert ladder.calls(65) == [(0, 65, 96)]
    assert ladder.calls(300) == [(0, 128, 128), (128, 128, 128), (256, 44, 64)]
    assert RowPlan(33, (33, 34, 35, 64)).max_native_rows == 35 and RowPlan(2).max_native_rows is None


def test_probed_row_plans_are_kept_on_disk_and_read_back(tmp_path, monkeypatch):
    import ladle.model.packed as packed

    if not packed.packing_available(torch.float32, torch.device("cpu")):
        pytest.skip("no oneDNN packing here")
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    assert packed.pack_linears(model, str(tmp_path)) == 2
    (saved,) = tmp_path.glob("row-plans-*.json")
    assert set(json.loads(saved.read_text())) == {"float32:96x64", "float32:64x96"}
    monkeypatch.setattr(packed, "row_plan", lambda *a: pytest.fail("probed again instead of read from disk"))
    again = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    assert packed.pack_linears(again, str(tmp_path)) == 2
    assert again[0].plan == model[0].plan


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(576, 1536), (960, 576)])  # SmolLM2's down and qkv projections
def test_packed_rows_have_the_same_bits_in_calls_of_any_size(dtype, shape):
    """Whatever this CPU's oneDNN needs (no padding, padding of small calls, or a ladder of row
    counts on AMX), the probed plan gives every row the bits it has in one call of all rows."""
    from ladle.model.packed import PackedLinear, packing_available, row_plan

    if not packing_available(dtype, torch.device("cpu")):
        pytest.skip(f"Ladle keeps F.linear for {dtype} on this CPU (no native bf16)")
    plan = row_plan(dtype, *shape)
    assert plan is not None, f"no invariant shaping of oneDNN's {dtype} linear {shape} on this CPU"
    g = torch.Generator().manual_seed(1)
    layer = PackedLinear(torch.randn(*shape, generator=g).to(dtype), None, plan)
    x = torch.randn(1100, shape[1], generator=g).to(dtype)
    full = layer(x)
    for n in (*range(1, 70), 100, 255, 256, 257, 300, 511, 512, 513, 700):
        rows = torch.cat([layer(x[start : start + n]) for start in range(0, len(x), n)])
        assert torch.equal(rows, full), (n, plan)


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
        loaded = load_model(
            resolve_model(str(tiny_models["llama"].hf_dir)), dtype="float32", quantization=method,
            calibration_forward=prefill_hidden_states,
        )  # fmt: skip
        assert isinstance(loaded.model.lm_head, Int8Linear)
        assert not isinstance(loaded.model.model.embed_tokens, QuantLinear)


# ---- w8a8: int8 weights and int8 activations --------------------------------------------------


def make_w8a8(rows_scale=3.0, bias=True):
    from ladle.model.quant import W8A8Linear

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x_max = torch.rand(64, generator=g) * rows_scale + 0.1
    x_max[5] = 40.0  # one outlier channel, as LLM activations have
    return W8A8Linear(w, b, x_max), w, b, x_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_compiled_kernels_equal_their_pytorch_twin_and_ignore_the_batch(dtype):
    layer, w, b, x_max = make_w8a8()
    if layer.kernels is None:
        pytest.skip("Ladle's CPU kernels do not build here")
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(37, 64, generator=g) * x_max / 3).to(dtype)
    compiled = layer(x)
    kernels, layer.kernels = layer.kernels, None
    try:
        twin = layer(x)
    finally:
        layer.kernels = kernels
    assert torch.equal(compiled, twin)
    for rows in (slice(0, 1), slice(5, 9), slice(36, 37)):  # a row's result never depends on its batch
        assert torch.equal(layer(x[rows]), compiled[rows])


def test_w8a8_is_close_to_the_float_product_despite_an_outlier_channel():
    layer, w, b, x_max = make_w8a8()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g) * x_max / 3
    exact = x @ w.t() + b
    err = (layer(x) - exact).norm() / exact.norm()
    assert err < 0.02, err
    # the smoothing pays: the same layer without it (alpha 0: s = 1) is worse on these rows
    from ladle.model.quant import W8A8Linear

    plain = W8A8Linear(w, b, torch.ones(64), alpha=0.0)
    assert err < (plain(x) - exact).norm() / exact.norm()
    assert (layer.dequantize() - w).norm() / w.norm() < 0.03


def test_w8a8_model_calibrates_and_keeps_greedy_tokens_batch_independent(tiny_models):
    from ladle.engine.llm import LLM
    from ladle.model.quant import W8A8Linear
    from ladle.sample.params import SamplingParams

    source = resolve_model(str(tiny_models["qwen2"].hf_dir))
    plain = load_model(source, dtype="float32", device="cpu")
    loaded = load_model(
        source, dtype="float32", device="cpu", quantization="w8a8", calibration_forward=prefill_hidden_states
    )
    assert sum(isinstance(m, W8A8Linear) for m in loaded.model.modules()) == 4 * loaded.spec.num_layers + 1
    layer = loaded.model.model.layers[1].self_attn.qkv_proj
    assert (layer.inv_smooth != 1).any()  # smoothing came from the calibration pass
    x = torch.randn(7, plain.spec.hidden_size)
    a = plain.model.model.layers[1].mlp.gate_up_proj(x)
    b = loaded.model.model.layers[1].mlp.gate_up_proj(x)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99

    llm = LLM(str(tiny_models["qwen2"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05, loaded=loaded)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[(7 * i + 3 * j) % 300 + 1 for j in range(5 + 3 * i)] for i in range(6)]
    together = [r.token_ids for r in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (7, 50, 33), (13, 16, 2), (100, 130, 576), (6, 1, 7), (200, 1000, 64)])
def test_int8_gemm_gives_the_integers_of_torch_int_mm(m, n, k):
    """Ladle's AVX2 int8 product (used where torch._int_mm has no VNNI path) is exact: the same
    int32 sums, at any row count, panel remainder and odd input count, at the extremes of int8,
    on one thread and on several (the threads take runs of panels as they come free)."""
    from ladle.model.quant import _cpu_kernels, pack_int8_panels

    kernels = _cpu_kernels()
    if kernels is None:
        pytest.skip("Ladle's CPU kernels do not build here")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    a[0, :] = 127  # the largest sums the int32 accumulators must hold
    w[0, :] = -127
    expected = (a.long() @ w.long().t()).int()
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            assert torch.equal(kernels.int8_gemm(a, pack_int8_panels(w), n), expected), t
    finally:
        torch.set_num_threads(threads)


def test_w8a8_panel_layout_gives_the_same_outputs_as_int_mm():
    """The two int8 products behind w8a8 (panels on AVX2 machines, torch._int_mm with VNNI) agree
    bit for bit, and the panel layout unpacks to the same weight."""
    layer, w, b, x_max = make_w8a8()
    if layer.kernels is None:
        pytest.skip("Ladle's CPU kernels do not build here")
    from ladle.model.quant import pack_int8_panels

    rows = layer.int8_weight().contiguous()
    x = torch.randn(21, 64, generator=torch.Generator().manual_seed(4)) * x_max / 3
    outputs = {}
    for panels in (True, False):
        layer.qweight = pack_int8_panels(rows) if panels else rows  # the layout says which product runs
        assert layer.panels == panels
        assert torch.equal(layer.int8_weight(), rows)
        outputs[panels] = layer(x)
    assert torch.equal(outputs[True], outputs[False])


def test_w8a8_calibration_is_kept_between_loads_and_gives_the_same_model(tiny_models, tmp_path):
    from ladle.model import quant

    source = resolve_model(str(tiny_models["llama"].hf_dir))
    fresh = load_model(
        source, dtype="float32", device="cpu", quantization="w8a8", calibration_forward=prefill_hidden_states
    )
    first = load_model(
        source,
        dtype="float32",
        device="cpu",
        quantization="w8a8",
        calibration_cache=str(tmp_path),
        calibration_forward=prefill_hidden_states,
    )
    (file,) = tmp_path.glob("calibration-*.pt")
    calls = []
    real = quant.input_absmax

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    quant.input_absmax = counted
    try:
        second = load_model(
            source,
            dtype="float32",
            device="cpu",
            quantization="w8a8",
            calibration_cache=str(tmp_path),
            calibration_forward=prefill_hidden_states,
        )
    finally:
        quant.input_absmax = real
    assert not calls  # the second load read the file instead of calibrating
    x = torch.randn(3, fresh.spec.hidden_size)
    for a, b in ((fresh, first), (fresh, second)):
        for la, lb in zip(a.model.model.layers, b.model.model.layers, strict=True):
            assert torch.equal(la.mlp.gate_up_proj.inv_smooth, lb.mlp.gate_up_proj.inv_smooth)
            assert torch.equal(la.mlp.gate_up_proj(x), lb.mlp.gate_up_proj(x))
    file.write_bytes(b"not a torch file")  # a damaged cache is recomputed, not an error
    third = load_model(
        source,
        dtype="float32",
        device="cpu",
        quantization="w8a8",
        calibration_cache=str(tmp_path),
        calibration_forward=prefill_hidden_states,
    )
    assert torch.equal(third.model.lm_head.inv_smooth, fresh.model.lm_head.inv_smooth)
