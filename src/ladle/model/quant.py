"""Weight-only quantization of the decoder's linear layers (`--quantization int8|int4`).

Decoding one token reads every weight once, so a step costs what reading the weights costs: int8
halves the bytes of bf16, int4 quarters them. Activations stay in the model's dtype; only weights
are quantized: the four projections of each layer (q/k/v, o, gate/up, down) in the chosen format,
and the lm_head as int8 per channel under every method (a tied head gets its own int8 copy). The
embedding stays in the model's dtype.

- int8: symmetric, one scale per output channel: w ≈ q * scale, q in [-127, 127].
- int4: asymmetric, one (scale, min) per group of `group_size` inputs of an output channel:
  w ≈ q * scale + min, q in [0, 15].
- from-gguf: a GGUF file's own blocks, without requantizing: Q4_0 and Q4_1 weights are exactly
  int4 with groups of 32 (Q4_1: w = d * q + m; Q4_0: w = d * (q - 8)); Q8_0 weights become int8
  per channel (requantized from the blocks: Q8_0 scales every 32 inputs, the int8 kernel one
  scale per channel); other types stay in the model's dtype.

Two ways to multiply, picked per call by the number of rows:
- few rows (decode): kernels that read the quantized weights directly. Ladle's own (`int8_linear`,
  `int4_linear` in ladle/model/csrc, AVX2 where the CPU has it) where they build, else PyTorch's
  `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`. On a 2-core AVX2 EPYC, 30 layers of
  SmolLM2-135M at 1 row: int8 8.8 ms against PyTorch's 52 ms, int4 (groups of 32) 8.3 ms against
  ~100 ms; PyTorch's cost the same per row, so they also lose to a bf16 GEMM above a few dozen rows
  (on a 2-core AVX-512 EPYC: equal at 16 rows, 2x slower at 64, 2.7x at 2048 for a 576x3072 layer).
- many rows (prefill, large batches): the weight is dequantized one tile of output channels at a
  time into a small buffer and multiplied with the ordinary GEMM; the tile's conversion is paid
  once for all rows (at 2048 rows, +7% over bf16). The whole matrix is never materialised.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ladle.config import check_quantization
from ladle.errors import LadleError

# each quantized projection of a decoder layer → the checkpoint tensors stacked in it, in order
PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


class QuantLinear(nn.Module):
    """A linear layer y = x W^T + b whose W is held quantized (subclasses say how)."""

    # rows up to which the packed kernel beats dequantize-tile-and-GEMM (measured, see the module doc)
    packed_max_rows = 48
    tile_rows = 512  # output channels dequantized at a time on the many-rows path

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.packed_max_rows and self.packed_available(rows):
            out = self.packed_mm(rows)
        else:
            out = self.tiled_mm(rows)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def tiled_mm(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, self.tile_rows):
            end = min(start + self.tile_rows, self.out_features)
            torch.mm(x, self.dequantize_rows(start, end, x.dtype).t(), out=out[:, start:end])
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight [out, in], for tests and tools (never on the serving path)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def packed_available(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu"

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


def _cpu_kernels():
    """Ladle's compiled CPU kernels (shared with the attention backend), or None where they do not build."""
    from ladle.model.attention import PagedCPUBackend

    return PagedCPUBackend.loader().load()


class Int8Linear(QuantLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)  # [out, in] int8
        self.register_buffer("scales", scale.to(weight.dtype))  # [out], the activations' dtype
        self.kernels = _cpu_kernels()  # Ladle's compiled kernels, or None (PyTorch's then)
        if self.kernels is not None:  # Ladle's kernel beats dequantize-and-GEMM up to ~128 rows (AVX2)
            self.packed_max_rows = 128

    def packed_mm(self, x):
        if self.kernels is not None:  # Ladle's own kernel (ladle/model/csrc), 3-25x faster
            return self.kernels.int8_linear(x, self.qweight, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))

    def dequantize_rows(self, start, end, dtype):
        return self.qweight[start:end].to(dtype) * self.scales[start:end, None].to(dtype)


class Int4Linear(QuantLinear):
    """Groups of `group_size` inputs share a scale and a minimum. Two copies of the 4-bit codes:
    PyTorch's packed layout for its kernel, and plain nibble pairs for the tiled path (each half
    the size of int8)."""

    inner_k_tiles = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 64):
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise LadleError(f"int4: a layer's {in_features} inputs do not split into groups of {group_size}")
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        groups = weight.detach().float().view(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15.0).clamp(min=1e-8)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
        self._store(q.view(out_features, in_features), scale, low, weight.dtype)

    @classmethod
    def from_codes(cls, codes, scale, low, dtype, group_size, bias=None):
        """Exact 4-bit codes [out, in] (0..15) with per-group scale and minimum [out, in/group]:
        w = codes * scale + low, as GGUF's Q4_0 / Q4_1 blocks store them (no requantization)."""
        self = cls.__new__(cls)
        QuantLinear.__init__(self, codes.shape[1], codes.shape[0], bias)
        self.group_size = group_size
        self._store(codes.to(torch.uint8), scale.float(), low.float(), dtype)
        return self

    def _store(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> None:
        # nibble pairs for the tiled path: low nibble = even input, high nibble = odd input
        self.register_buffer("codes", q[:, 0::2] | (q[:, 1::2] << 4))  # [out, in/2] uint8
        self.register_buffer("group_scale", scale.float())  # [out, groups], float32 (exact for GGUF's f16)
        self.register_buffer("group_min", low.float())  # [out, groups]
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=dtype))
        self.kernels = _cpu_kernels() if self.group_size % 32 == 0 else None  # Ladle's, where they serve
        if self.kernels is not None:  # beats dequantize-and-GEMM up to ~64 rows (AVX2)
            self.packed_max_rows = 64
        if self.kernels is None and self.in_features % (self.inner_k_tiles * 16) == 0:
            # PyTorch's kernel computes w = (q - 8) * scale + zero, so zero = min + 8 * scale
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), self.inner_k_tiles)
            zero = low + 8 * scale
            self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)

    def packed_available(self, x):
        return x.device.type == "cpu" and (self.kernels is not None or self.packed.numel() > 0)

    def packed_mm(self, x):
        if self.kernels is not None:  # Ladle's kernel (ladle/model/csrc): one copy of the codes, read as is
            return self.kernels.int4_linear(x, self.codes, self.group_scale, self.group_min, self.group_size)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros.to(x.dtype)
        )

    def dequantize_rows(self, start, end, dtype):
        pairs = self.codes[start:end]
        q = torch.stack([pairs & 15, pairs >> 4], dim=-1).view(end - start, -1, self.group_size)
        scale, low = self.group_scale[start:end, :, None], self.group_min[start:end, :, None]
        return (q.to(dtype) * scale.to(dtype) + low.to(dtype)).view(end - start, self.in_features)


def _projections(model: nn.Module):
    """(layer index, checkpoint shards, parent module, attribute name, linear) for every projection."""
    for i, layer in enumerate(model.model.layers):
        for path, shards in PROJECTIONS.items():
            parent_path, name = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            yield i, shards, parent, name, getattr(parent, name)


def quantize_model(model: nn.Module, method: str, group_size: int = 64) -> int:
    """Replace the decoder layers' projections by quantized ones in place; returns how many."""
    check_quantization(method)
    if method == "none":
        return 0
    if method == "from-gguf":
        raise LadleError("from-gguf quantization needs the GGUF file: use quantize_from_gguf")
    count = 0
    for _, _, parent, name, linear in _projections(model):
        if method == "int8":
            quantized = Int8Linear(linear.weight, linear.bias)
        else:
            quantized = Int4Linear(linear.weight, linear.bias, group_size)
        setattr(parent, name, quantized)
        count += 1
    quantize_head(model)
    return count


def quantize_head(model: nn.Module) -> None:
    """The lm_head as int8 per channel, whatever the projections' format: in a small model it is a
    fifth of the bytes read per token, and int8 costs it little (perplexity, see the README). A tied
    head gets its own int8 copy; the embedding stays in the model's dtype."""
    if type(model.lm_head) is nn.Linear:
        model.lm_head = Int8Linear(model.lm_head.weight, model.lm_head.bias)


def quantize_from_gguf(model: nn.Module, gguf, spec) -> dict[str, int]:
    """Load each projection in the Ladle format matching its GGUF type; returns counts by format."""
    counts = {"int4": 0, "int8": 0, "unchanged": 0}
    for i, shards, parent, name, linear in _projections(model):
        targets = [f"model.layers.{i}.{shard}.weight" for shard in shards]
        types = {gguf.tensor_type(t) for t in targets}
        if types <= {"Q4_0", "Q4_1"}:
            parts = [gguf.q4_blocks(t, spec) for t in targets]
            codes, scale, low = (torch.from_numpy(np.concatenate([p[j] for p in parts])) for j in range(3))
            quantized = Int4Linear.from_codes(codes, scale, low, linear.weight.dtype, 32, linear.bias)
            counts["int4"] += 1
        elif types == {"Q8_0"}:
            quantized = Int8Linear(linear.weight, linear.bias)
            counts["int8"] += 1
        else:
            counts["unchanged"] += 1
            continue
        setattr(parent, name, quantized)
    quantize_head(model)
    return counts
