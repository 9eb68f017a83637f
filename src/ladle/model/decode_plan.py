"""A step's layers in one compiled call (`DecodePlan` in ladle/model/csrc).

At a few rows, a decoder layer is a dozen small calls (norms, four projections, rotary, the KV
write, attention); made one by one from Python, they cost more than their work: on a 2-core EPYC at
one token, ~6 ms of a ~20 ms step. The plan takes every layer's weights and KV cache once, and
then runs embedding, layers and final norm in C++ with the same kernels in the same order as the
modules (the same outputs bit for bit, which a test checks against the modules).

It applies where every piece has a compiled form: a Llama-family model on the CPU with the `cpu`
attention backend (C++ kernels built), and each projection a plain `nn.Linear`, a `PackedLinear`
(oneDNN), a `W8A8Linear`, or an `Int8Linear` on its few-rows path. Elsewhere (`sdpa`, int4
weights, a GPU) `build_decode_plan` returns None and the modules run. The `cpu` backend computes
every token as a decode of its position, so prompt chunks run through the plan as well (each row
with its own block table and context length); only steps of more rows than `max_rows` (int8's
few-rows limit, or the top of the run of row counts a packed projection's ladder takes as they are)
take the modules.
"""

from __future__ import annotations

import torch
from torch import nn

from ladle.model.ops import CpuKernelOps
from ladle.model.packed import PackedLinear
from ladle.model.quant import Int8Linear, W8A8Linear

# projection forms of the C++ plan (LinearKind in cpu_kernels.cpp)
DENSE, W8A8_PANELS, W8A8_INT_MM, INT8, ONEDNN = 0, 1, 2, 3, 4
ANY_ROWS = 1 << 30  # a form whose compiled call takes any number of rows


def linear_spec(module: nn.Module) -> tuple[int, list[torch.Tensor], torch.Tensor | None, int, int] | None:
    """(form, tensors, bias, fewest rows a call is padded to, most rows) of a projection, as the
    module computes it at few rows; None for a form the plan does not have."""
    if type(module) is nn.Linear:
        return DENSE, [module.weight], module.bias, 1, ANY_ROWS
    if isinstance(module, PackedLinear):
        plan = module.plan  # a ladder's calls: the plan pads to its smallest count, takes the run above it
        return ONEDNN, [module.packed_weight], module.bias, plan.min_rows, plan.max_native_rows or ANY_ROWS
    if isinstance(module, W8A8Linear) and module.kernels is not None:
        form = W8A8_PANELS if module.panels else W8A8_INT_MM  # the qweight's layout says which product
        return form, [module.qweight, module.inv_smooth, module.w_scale], module.bias, 1, ANY_ROWS
    if isinstance(module, Int8Linear) and module.kernels is not None:
        # int8_linear serves up to packed_max_rows; beyond it the module dequantizes tiles
        return INT8, [module.qweight, module.scales], module.bias, 1, module.packed_max_rows
    return None


class DecodePlan:
    """The compiled plan of one model over one KV cache, and the most rows it takes in a step."""

    def __init__(self, plan, max_rows: int):
        self.plan, self.max_rows = plan, max_rows

    def run(self, input_ids, positions, slot_mapping, block_tables, context_lens) -> torch.Tensor:
        """[T] tokens, one decode per request → final-normed hidden states [T, hidden]."""
        return self.plan.run(input_ids, positions, slot_mapping, block_tables, context_lens)


def build_decode_plan(model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> DecodePlan | None:
    """The plan of a loaded Llama-family model over its runner's KV cache, or None where a piece
    has no compiled form (the modules then run every step)."""
    m = getattr(model, "model", None)
    if m is None or not isinstance(m.ops, CpuKernelOps) or m.embed_tokens.weight.device.type != "cpu":
        return None
    attn0 = m.layers[0].self_attn
    if getattr(attn0.backend, "name", None) != "cpu":
        return None
    spec = model.spec
    plan = m.ops.k.DecodePlan(
        m.embed_tokens.weight, m.norm.weight, m.norm.eps, m.rotary.cos_sin,
        spec.num_heads, spec.num_kv_heads, spec.head_dim, attn0.scale,
    )  # fmt: skip
    max_rows = ANY_ROWS
    for layer, (k_cache, v_cache) in zip(m.layers, kv_caches, strict=True):
        specs = [linear_spec(p) for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                          layer.mlp.gate_up_proj, layer.mlp.down_proj)]  # fmt: skip
        if any(s is None for s in specs):
            return None
        max_rows = min([max_rows, *(s[4] for s in specs)])
        plan.add_layer(
            layer.input_layernorm.weight, layer.input_layernorm.eps,
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps,
            k_cache, v_cache, *(s[:4] for s in specs),
        )  # fmt: skip
    return DecodePlan(plan, max_rows)
