"""GGUF files (llama.cpp's format): metadata, tokenizer and weights (header: ladle.model.gguf_reader;
blocks dequantized by the `gguf` package).

Quantized weights are dequantized once, at load time, into the dtype asked for. llama.cpp stores
the q and k projections of "llama" models with their rows permuted for its interleaved RoPE; they
are put back in the Hugging Face order here, so one model implementation serves both formats.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ladle.errors import ModelLoadError
from ladle.model.spec import TransformerSpec, spec_from_gguf_metadata

# Tensor types Ladle dequantizes at load.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor names → Hugging Face names ("{i}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style per-frequency divisors


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows come as interleaved (even, odd) pairs;
    Hugging Face's rotate-half layout puts all even rows first, then all odd rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_row_order(rows: np.ndarray, hf_target: str, spec: TransformerSpec) -> np.ndarray:
    """An array whose axis 0 follows the output rows of `hf_target` (a weight, or its per-row
    quantization codes and scales), put back in Hugging Face order."""
    if spec.architecture != "llama":
        return rows
    if ".q_proj." in hf_target:
        return unpermute_rope_rows(rows, spec.num_heads)
    if ".k_proj." in hf_target:
        return unpermute_rope_rows(rows, spec.num_kv_heads)
    return rows


class GGUFFile:
    """An opened GGUF file: decoded metadata now, weights on demand."""

    def __init__(self, path: Path):
        from ladle.model.gguf_reader import read_gguf

        self.path = path
        try:
            self.metadata, tensors = read_gguf(path)
        except Exception as e:  # ValueError, struct.error, OSError, UnicodeError ... on bad files
            raise ModelLoadError(path, f"corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in tensors}
        self._by_hf_name = {hf: name for name in self.tensors if (hf := hf_name(name)) is not None}
        self._check_tensor_types()

    def _check_tensor_types(self) -> None:
        for t in self.tensors.values():
            type_name = t.tensor_type.name
            if type_name not in SUPPORTED_TYPES:
                raise ModelLoadError(
                    self.path,
                    f"tensor {t.name!r} has GGUF type {type_name}, which Ladle cannot load "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})",
                )

    def spec(self) -> TransformerSpec:
        return spec_from_gguf_metadata(self.metadata, self.path, has_output_weight="output.weight" in self.tensors)

    def tokenizer(self, model_eos_ids=()):
        from ladle.model.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.metadata, self.path, model_eos_ids)

    def dequantize(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            return w if w.flags.writeable else w.copy()  # F32 tensors come as read-only file views
        except Exception as e:
            raise ModelLoadError(self.path, f"tensor {name!r} cannot be read ({type(e).__name__}: {e})") from None

    def weights(self, spec: TransformerSpec) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 array) for every weight tensor, in file order."""
        for name in self.tensors:
            if name == ROPE_FREQS:
                continue
            target = hf_name(name)
            if target is None:
                raise ModelLoadError(self.path, f"tensor {name!r} is not part of a {spec.architecture} model")
            yield target, _hf_row_order(self.dequantize(name), target, spec)

    def q4_blocks(self, hf_target: str, spec: TransformerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The exact 4-bit codes of a Q4_0 / Q4_1 weight, in Hugging Face row order: (codes [N, K]
        uint8 in 0..15, scale [N, K/32], minimum [N, K/32]) with w = codes * scale + minimum.
        None when the tensor has another type."""
        if hf_target not in self._by_hf_name:
            raise ModelLoadError(self.path, f"no GGUF tensor holds {hf_target!r}")
        t = self.tensors[self._by_hf_name[hf_target]]
        kind = t.tensor_type.name
        if kind not in ("Q4_0", "Q4_1"):
            return None
        rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists dimensions innermost first
        head = 2 if kind == "Q4_0" else 4  # f16 scale (Q4_0), f16 scale + f16 minimum (Q4_1)
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(rows, cols // 32, head + 16)
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == "Q4_1":
            low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        else:
            low = -8.0 * scale  # Q4_0: w = scale * (q - 8)
        packed = blocks[..., head:]  # [rows, blocks, 16]: element j in the low nibble, j + 16 in the high
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(rows, cols)
        return tuple(np.ascontiguousarray(_hf_row_order(a, hf_target, spec)) for a in (codes, scale, low))

    def tensor_type(self, hf_target: str) -> str | None:
        name = self._by_hf_name.get(hf_target)
        return None if name is None else self.tensors[name].tensor_type.name

    def rope_frequency_factors(self) -> np.ndarray | None:
        return self.dequantize(ROPE_FREQS) if ROPE_FREQS in self.tensors else None
