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

from collections.abc import Callable
from pathlib import Path

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


class W8A8Linear(QuantLinear):
    """int8 weights and int8 activations (`--quantization w8a8`): the product runs on integers,
    exact in int32, then scaled back: `torch._int_mm` where the CPU has VNNI (~1.9x a bf16 GEMM's
    rate on a 2-core AVX-512 EPYC), else Ladle's AVX2 `w8a8_linear` on a panel layout of the weight
    (int16 pairs through vpmaddwd; the same integers, the same outputs bit for bit). Weights: one
    scale per output channel. Activations: one scale per row (token), computed at run time, so a
    row's result never depends on the other rows of its batch. SmoothQuant: the few input channels
    whose activations are far larger than the rest would spend a row's int8 range, so each input
    channel j is divided by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) and its weights multiplied
    by it (the product is unchanged), moving the difficulty from activations to weights; max|x_j|
    is measured on a calibration pass at load (`input_absmax`). The lm_head is W8A8 too (alpha 0.3).

    Perplexity of SmolLM2-135M (bf16 13.699 on the shipped text, 112.62 on DEVELOPERS.md as a
    held-out check), by (projections' alpha, head's alpha): no smoothing 14.24 (+4.0%, head in bf16);
    (0.5, 0.5) 13.974 / 114.81; (0.55, 0.5) 13.891 / 115.07; (0.6, 0.5) 14.032 / 115.65;
    (0.5, 0.3) 13.948 / 115.13; (0.55, 0.3) 13.832 / 114.30, the default. Those were measured before
    `dequantize_int32` fixed its rounding order (to equal the PyTorch twin bit for bit); as shipped the
    default scores 13.910 / 114.13, +1.5% / +1.3%. That a last-bit change moves it by 0.6% says how
    much of the grid's spread is noise: read it as "w8a8 costs 1-2% here", not as a tuned optimum."""

    PROJECTION_ALPHA, HEAD_ALPHA = 0.55, 0.3

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_absmax: torch.Tensor,
        alpha: float = PROJECTION_ALPHA,
    ):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        w = weight.detach().float()
        x_max = input_absmax.float().clamp(min=1e-5)
        smooth = (x_max**alpha / w.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        w = w * smooth
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [out, in]
        self.register_buffer("w_scale", scale)  # [out] float32
        self.register_buffer("inv_smooth", (1.0 / smooth).float())  # [in] float32
        self.kernels = _cpu_kernels()
        # where torch._int_mm has no fast path (no VNNI: ~2 GOP/s on an AVX2 EPYC), Ladle's AVX2
        # product on a panel layout of the weight; both give the same int32 sums
        panels = self.kernels is not None and not int_mm_is_fast()
        self.register_buffer("qweight", pack_int8_panels(q) if panels else q)

    @property
    def panels(self) -> bool:
        """Whether qweight is in `int8_gemm`'s panel layout [N/16, K/2, 16, 2] (else [out, in])."""
        return self.qweight.dim() == 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        k = self.kernels
        if self.panels and k is not None:  # quantize, product and dequantize in one compiled call
            out = k.w8a8_linear(rows, self.inv_smooth, self.qweight, self.w_scale, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        quantize = k.quantize_rows_int8 if k is not None else quantize_rows_int8
        q, row_scale = quantize(rows, self.inv_smooth)
        acc = torch._int_mm(q, self.int8_weight().contiguous().t())  # [rows, out] int32, exact
        if k is not None:
            out = k.dequantize_int32(acc, row_scale, self.w_scale, self.bias, x.dtype)
        else:
            out = acc.float() * row_scale[:, None] * self.w_scale
            out = (out if self.bias is None else out + self.bias.float()).to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight [out, in], whichever layout holds it."""
        if not self.panels:
            return self.qweight
        panels, pairs = self.qweight.shape[:2]
        rows = self.qweight.permute(0, 2, 1, 3).reshape(panels * PANEL, pairs * 2)
        return rows[: self.out_features, : self.in_features]

    def dequantize_rows(self, start, end, dtype):
        w = self.int8_weight()[start:end].float() * self.w_scale[start:end, None] * self.inv_smooth
        return w.to(dtype)


PANEL = 16  # output channels per panel of `int8_gemm` (ladle/model/csrc)


def pack_int8_panels(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] into the compiled `int8_gemm`'s layout: [N/16, K/2, 16, 2], zero-padded (for each
    panel of 16 output channels and each pair of inputs, the channels' two weights side by side)."""
    n, k = q.shape
    padded = q.new_zeros(-(-n // PANEL) * PANEL, k + k % 2)
    padded[:n, :k] = q
    return padded.view(-1, PANEL, padded.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()


def int_mm_is_fast() -> bool:
    """Whether PyTorch's int8 product has a fast CPU path here (oneDNN with VNNI or AMX)."""
    from ladle.platform import cpu_features

    features = cpu_features()
    return features.avx512_vnni or features.amx_bf16


def quantize_rows_int8(x: torch.Tensor, inv_smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of the compiled `quantize_rows_int8`: rows times 1/s, int8 with a scale per row."""
    r = x.float() * inv_smooth
    scale = (r.abs().amax(dim=1) * (1.0 / 127.0)).clamp(min=1e-12)
    q = torch.round(r * (1.0 / scale)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


HEAD_KEY = (-1, "lm_head")
PrefillForward = Callable[[object, list[int]], torch.Tensor]  # (loaded model, ids) -> final hidden states
CALIBRATION_TOKENS = 1024  # random token ids, seeded: the channels that carry outliers do so for any text


@torch.inference_mode()
def input_absmax(
    loaded, forward: PrefillForward, num_tokens: int = CALIBRATION_TOKENS, seed: int = 0
) -> dict[tuple[int, str], torch.Tensor]:
    """Largest |input| per channel of every projection, by (layer index, projection name), over one
    prefill of seeded random tokens, run by forward(loaded, ids) -> final hidden states (whoever
    owns the runner supplies it); the model still in its float weights."""
    import random

    n = min(num_tokens, loaded.max_model_len)
    rng = random.Random(seed)
    ids = [rng.randrange(loaded.tokenizer.vocab_size) for _ in range(n)]
    stats: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, _, _, name, linear in _projections(loaded.model):
        key = (i, name)

        def record(module, args, key=key):
            x = args[0].reshape(-1, args[0].shape[-1]).float().abs().amax(dim=0)
            stats[key] = x if key not in stats else torch.maximum(stats[key], x)

        hooks.append(linear.register_forward_pre_hook(record))
    try:
        hidden = forward(loaded, ids)
        stats[HEAD_KEY] = hidden.float().abs().amax(dim=0)  # the lm_head's input
    finally:
        for h in hooks:
            h.remove()
    return stats


def calibration_key(loaded, num_tokens: int = CALIBRATION_TOKENS, seed: int = 0) -> str:
    """What `input_absmax` depends on: the model files (path, size, modification time), the dtype,
    attention backend and context bound, the calibration's own settings, and the code's versions."""
    import hashlib

    import ladle

    path = loaded.source.path
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    parts = []
    for f in files:
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    parts += [str(loaded.dtype), loaded.attention_backend, str(min(num_tokens, loaded.max_model_len)), str(seed)]
    parts += [torch.__version__, ladle.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached_input_absmax(loaded, cache_dir: Path | None, forward: PrefillForward) -> dict[tuple[int, str], torch.Tensor]:
    """`input_absmax`, kept in cache_dir between starts (the calibration pass is most of a w8a8
    model's load on a small CPU: ~6 of 13 s on a 2-core EPYC). It is deterministic, so a cached
    result is the result. None: always computed."""
    import logging
    import os
    import pickle

    if cache_dir is None:
        return input_absmax(loaded, forward)
    file = Path(cache_dir).expanduser() / f"calibration-{calibration_key(loaded)}.pt"
    try:
        rows = torch.load(file, weights_only=True)
        return {(int(i), str(name)): t for i, name, t in rows}
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError):  # absent or damaged
        pass
    stats = input_absmax(loaded, forward)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        torch.save([(i, name, t) for (i, name), t in stats.items()], tmp)
        os.replace(tmp, file)
    except OSError as e:  # a read-only home: calibrate at every start
        logging.getLogger(__name__).warning("cannot keep the w8a8 calibration in %s: %s", cache_dir, e)
    return stats


def _projections(model: nn.Module):
    """(layer index, checkpoint shards, parent module, attribute name, linear) for every projection."""
    for i, layer in enumerate(model.model.layers):
        for path, shards in PROJECTIONS.items():
            parent_path, name = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            yield i, shards, parent, name, getattr(parent, name)


def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = 64,
    input_absmax: dict[tuple[int, str], torch.Tensor] | None = None,
    between: Callable[[], object] | None = None,
) -> int:
    """Replace the decoder layers' projections by quantized ones in place; returns how many.
    w8a8 needs `input_absmax` (see the function of that name). between: called after each."""
    check_quantization(method)
    if method == "none":
        return 0
    if method == "from-gguf":
        raise LadleError("from-gguf quantization needs the GGUF file: use quantize_from_gguf")
    if method == "w8a8" and input_absmax is None:
        raise LadleError("w8a8 quantization needs the activations' ranges: run input_absmax first")
    count = 0
    for i, _, parent, name, linear in _projections(model):
        if method == "w8a8":
            quantized = W8A8Linear(linear.weight, linear.bias, input_absmax[(i, name)])
        elif method == "int8":
            quantized = Int8Linear(linear.weight, linear.bias)
        else:
            quantized = Int4Linear(linear.weight, linear.bias, group_size)
        setattr(parent, name, quantized)
        count += 1
        if between is not None:
            between()
    if method == "w8a8":  # the head too: int8 x int8 is fast at any number of rows
        head = model.lm_head
        model.lm_head = W8A8Linear(head.weight, head.bias, input_absmax[HEAD_KEY], W8A8Linear.HEAD_ALPHA)
    else:
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
