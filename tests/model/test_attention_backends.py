"""The C++ paged decode kernel against its PyTorch twin, and its fallback."""

from __future__ import annotations

import shutil

import pytest
import torch

from ladle.model.attention import BACKENDS, AttentionMetadata, PagedCPUBackend, TorchSDPABackend
from ladle.model.cpu_kernels import KernelLoader


@pytest.fixture(scope="module")
def cpu_backend():
    """Where a C++ compiler exists the kernels must build: a build error is a failure, not a skip."""
    if not PagedCPUBackend.available():
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"the C++ kernels failed to build: {PagedCPUBackend.loader().failure}")
        pytest.skip("no C++ compiler on this machine: the PyTorch path serves instead")
    return BACKENDS["cpu"]()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_paged_decode_kernel_matches_the_pytorch_path(cpu_backend, dtype, atol):
    g = torch.Generator().manual_seed(0)
    num_kv_heads, head_dim, block_size, num_heads, batch = 2, 32, 4, 6, 5
    num_blocks = 40
    k_cache = torch.randn(num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 4, 5, 17, 30])
    tables = torch.randperm(num_blocks, generator=g)[: batch * 8].view(batch, 8)
    q = torch.randn(batch, num_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), batch, tables, lens, [], int(lens.max()))
    expected = TorchSDPABackend._decode(q.float(), (k_cache.float(), v_cache.float()), meta, 0.2)
    got = cpu_backend._decode(q, (k_cache, v_cache), meta, 0.2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=0)


def test_model_logits_agree_between_backends(tiny_models, cpu_backend):
    from ladle.model.loader import load_model
    from ladle.model.source import resolve_model
    from ladle.runner.model_runner import ModelRunner, StepChunk

    source = resolve_model(str(tiny_models["llama"].hf_dir))
    outs = []
    for backend in ("sdpa", "cpu"):
        loaded = load_model(source, dtype="float32", device="cpu", attention_backend=backend)
        runner = ModelRunner(loaded, num_blocks=32, block_size=4)
        runner.execute([StepChunk(list(range(3, 40)), 0, list(range(10))), StepChunk([5, 6, 7], 0, [10])])
        outs.append(runner.execute([StepChunk([9], 37, list(range(10))), StepChunk([8], 3, [10])]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_a_kernel_that_cannot_build_falls_back(tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++")
    loader = KernelLoader(broken)
    assert loader.load() is None
    assert loader.failure
    assert loader.load() is None  # the failure is remembered, not retried


def test_two_checkouts_of_the_same_source_share_one_build(tmp_path, monkeypatch):
    """The build file names its source's path: built from each checkout's own path, two checkouts
    rebuilt over each other on every start (a minute and more each time)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    loaders = []
    for checkout in ("one", "two"):
        (tmp_path / checkout).mkdir()
        source = tmp_path / checkout / "kernels.cpp"
        source.write_text("// the same source\n")
        loaders.append(KernelLoader(source))
    (dir_a, src_a), (dir_b, src_b) = (loader._stage(loader.build_name()) for loader in loaders)
    assert dir_a == dir_b and src_a == src_b and src_a.parent == dir_a
    assert src_a.read_text() == "// the same source\n" and not src_a.is_relative_to(tmp_path / "one")
    (tmp_path / "two" / "kernels.cpp").write_text("// changed\n")  # another source: another build
    assert loaders[1]._stage(loaders[1].build_name())[0] != dir_a


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_fused_elementwise_kernels_match_the_pytorch_ops(cpu_backend, dtype, atol):
    from ladle.model.ops import CpuKernelOps, TorchOps, get_ops

    fast, slow = get_ops("cpu"), TorchOps()
    assert isinstance(fast, CpuKernelOps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g).to(dtype)
    res = torch.randn(37, 96, generator=g).to(dtype)
    w = torch.rand(96, generator=g).to(dtype) + 0.5
    torch.testing.assert_close(fast.rms_norm(x, w, 1e-5), slow.rms_norm(x, w, 1e-5), atol=atol, rtol=0)
    h_fast, r_fast = fast.add_rms_norm(x, res.clone(), w, 1e-5)
    h_slow, r_slow = slow.add_rms_norm(x, res.clone(), w, 1e-5)
    torch.testing.assert_close(r_fast, r_slow, atol=atol, rtol=0)
    torch.testing.assert_close(h_fast, h_slow, atol=atol, rtol=0)
    gate_up = torch.randn(37, 2 * 80, generator=g).to(dtype)
    torch.testing.assert_close(fast.silu_and_mul(gate_up), slow.silu_and_mul(gate_up), atol=atol, rtol=0)
    heads, kv_heads, head_dim = 4, 2, 16
    qkv = torch.randn(37, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    positions = torch.randint(0, 200, (37,), generator=g)
    freqs = torch.outer(torch.arange(256).float(), torch.rand(head_dim // 2, generator=g))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    a, b = qkv.clone(), qkv.clone()
    fast.rotary(a, positions, cos_sin, heads, kv_heads, head_dim)
    slow.rotary(b, positions, cos_sin, heads, kv_heads, head_dim)
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    v = slice((heads + kv_heads) * head_dim, None)
    assert torch.equal(a[:, v], qkv[:, v])  # values are not rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kv_write_equals_index_copy(cpu_backend, dtype):
    """The C++ slot write puts k and v (strided views of a fused qkv row, as the model passes them)
    exactly where the PyTorch write does, and nothing else changes."""
    from ladle.model.attention import write_kv

    g = torch.Generator().manual_seed(3)
    num_kv_heads, num_blocks, block_size, head_dim, tokens = 3, 10, 4, 8, 7
    caches = [torch.randn(num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype) for _ in range(2)]
    qkv = torch.randn(tokens, (2 + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    _, k, v = qkv.split([2 * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    expected = [c.clone() for c in caches]
    write_kv(expected, k, v, slots)
    cpu_backend.write_kv(caches, k, v, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_backend.write_kv(caches, k, v, torch.full((tokens,), num_blocks * block_size))
