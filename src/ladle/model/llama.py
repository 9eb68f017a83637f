"""Llama-family decoder (Llama 2/3, Mistral without sliding window, SmolLM2).

The model knows nothing of requests: `forward` takes a flat batch of tokens with their positions
and the attention metadata the runner built, and returns hidden states; `compute_logits` runs the
lm_head only on the rows asked for (the last token of each request that samples).

Weights are named as in Hugging Face checkpoints; q/k/v and gate/up are fused into one matmul each,
so `load_weights` stacks those shards as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ladle.model.attention import AttentionBackend, AttentionMetadata, get_backend
from ladle.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from ladle.model.ops import TorchOps, get_ops
from ladle.model.spec import TransformerSpec

KVCache = tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(self, spec: TransformerSpec, backend: AttentionBackend, ops: TorchOps):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = spec.q_size, spec.kv_size
        self.scale = spec.head_dim**-0.5
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.backend = backend
        self.ops = ops

    def forward(self, x, positions, rotary: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        self.ops.rotary(qkv, positions, rotary.cos_sin, self.num_heads, self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream travels beside the hidden state, so each norm also does
    the residual add of the sublayer before it (one pass instead of two)."""

    def __init__(self, spec: TransformerSpec, backend: AttentionBackend, ops: TorchOps):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = SelfAttention(spec, backend, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SwiGLU(spec.hidden_size, spec.intermediate_size, ops)
        self.ops = ops

    def forward(self, x, residual, positions, rotary, kv_cache, meta):
        """x: the previous sublayer's output [T, H]; residual: the stream before it (None at layer 0)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual, h = x, self.ops.rms_norm(x, norm1.weight, norm1.eps)
        else:
            h, residual = self.ops.add_rms_norm(x, residual, norm1.weight, norm1.eps)
        h = self.self_attn(h, positions, rotary, kv_cache, meta)
        h, residual = self.ops.add_rms_norm(h, residual, norm2.weight, norm2.eps)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, spec: TransformerSpec, backend: AttentionBackend, ops: TorchOps, max_positions: int):
        super().__init__()
        # an uninitialised weight (every weight is loaded): nn.Embedding's own normal_() init, on the
        # meta device the loader builds on, imports torch._dynamo (1.6 s of every cold start)
        weight = torch.empty(spec.vocab_size, spec.hidden_size)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(spec, backend, ops) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = RotaryEmbedding(spec, max_positions)
        self.ops = ops


# checkpoint name suffix → (fused parameter suffix, shard index)
_STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: TransformerSpec, attention_backend: str = "sdpa", max_positions: int | None = None):
        """attention_backend: a registered name ("auto" is resolved by the loader, which knows the device)."""
        super().__init__()
        self.spec = spec
        self.model = Backbone(
            spec,
            get_backend(attention_backend),
            get_ops(attention_backend),
            max_positions or spec.max_position_embeddings,
        )
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the lm_head when the model ties them (again after moving
        devices: `to_empty` gives every parameter new storage)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64, tokens of all requests in the step
        positions: torch.Tensor,  # [T] int64, each token's position in its request
        kv_caches: list[KVCache],  # one (k, v) pair per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden] final-normed hidden states
        m = self.model
        x, residual = m.embed_tokens(input_ids), None
        for layer, kv_cache in zip(m.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, m.rotary, kv_cache, meta)
        return m.ops.add_rms_norm(x, residual, m.norm.weight, m.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] → [N, vocab] float32 logits, for the rows that sample only."""
        return self.lm_head(hidden).float()

    # -- weights ---------------------------------------------------------------------------------

    def shard_sizes(self, fused_suffix: str) -> list[int]:
        s = self.spec
        if fused_suffix.endswith("qkv_proj"):
            return [s.q_size, s.kv_size, s.kv_size]
        return [s.intermediate_size, s.intermediate_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters; returns the names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue  # tied: the embedding is the head
            target, shard = self._target(name)
            if target not in params:
                from ladle.errors import ModelLoadError

                raise ModelLoadError(name, "checkpoint tensor has no place in the model")
            param = params[target]
            if shard is None:
                dest = param.data
            else:
                sizes = self.shard_sizes(target.rsplit(".", 1)[0])
                start = sum(sizes[:shard])
                dest = param.data.narrow(0, start, sizes[shard])
            _copy_checked(dest, tensor, name)
            loaded.add(name)
        return loaded

    @staticmethod
    def _target(name: str) -> tuple[str, int | None]:
        for suffix, (fused, shard) in _STACKED.items():
            marker = f".{suffix}."
            if marker in name:
                return name.replace(marker, f".{fused}."), shard
        return name, None

    def expected_checkpoint_names(self) -> set[str]:
        """Checkpoint tensor names a complete checkpoint provides."""
        names = set()
        for name, _ in self.named_parameters():
            for suffix, (fused, _shard) in _STACKED.items():
                if f".{fused}." in name:
                    names.add(name.replace(f".{fused}.", f".{suffix}."))
            if not any(f".{fused}." in name for fused, _ in _STACKED.values()):
                names.add(name)
        if self.spec.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names


def _copy_checked(dest: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        from ladle.errors import ModelLoadError

        raise ModelLoadError(name, f"tensor has shape {tuple(src.shape)}, the model expects {tuple(dest.shape)}")
    dest.copy_(src)
