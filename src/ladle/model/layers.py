"""Building blocks shared by the Llama-family models: RMSNorm, rotary embeddings, SwiGLU MLP.

Every tensor here is a flat batch of tokens: [T, ...] where T counts the tokens of all requests in
one step; no batch or sequence axis.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ladle.model.spec import RopeScaling, TransformerSpec


class RMSNorm(nn.Module):
    """Holds the weight; the arithmetic (in fp32, as the reference does) is the ops object's."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[head_dim // 2] float32 angular frequencies, after the model's context-extension scaling.
    Computed on the CPU even inside the loader's meta-device build: PyTorch's meta arithmetic
    imports torch._dynamo on first use (1.6 s of every cold start)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1's scheme).
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """The cos/sin table of rotary embeddings ("rotate half" layout, as in Hugging Face weights),
    for every position up to the context length, so a step with tokens at arbitrary positions
    (prefill chunks, decodes) just indexes it. The rotation itself is the ops object's."""

    def __init__(self, spec: TransformerSpec, max_positions: int):
        super().__init__()
        self.head_dim = spec.head_dim
        inv_freq = rope_inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_positions
        self.register_buffer("cos_sin", self._table(inv_freq), persistent=False)

    def _table(self, inv_freq: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, D] float32

    def set_frequency_factors(self, factors: torch.Tensor) -> None:
        """GGUF files of Llama 3.1-style models carry per-frequency divisors (`rope_freqs.weight`)."""
        self.inv_freq = self.inv_freq / factors.float().to(self.inv_freq.device)
        self.cos_sin = self._table(self.inv_freq)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))  # [T, I] in between
