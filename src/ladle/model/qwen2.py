"""Qwen2 decoder: the Llama layout with a bias on the q, k and v projections.

The spec's `attention_bias` (always true for Qwen2) gives the fused qkv projection its bias; the
rest (GQA, RMSNorm, SwiGLU, rotate-half RoPE, tied or untied head) is the Llama family's.
"""

from __future__ import annotations

from ladle.model.llama import LlamaForCausalLM
from ladle.model.spec import TransformerSpec


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, spec: TransformerSpec, attention_backend: str = "sdpa", max_positions: int | None = None):
        if not spec.attention_bias:
            raise ValueError("Qwen2 models have q/k/v biases: spec.attention_bias must be true")
        super().__init__(spec, attention_backend, max_positions)
