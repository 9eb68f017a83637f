"""Linear layers with their weights reordered once, at load, into oneDNN's blocked layout.

PyTorch's `F.linear` on a CPU hands oneDNN the plain [out, in] weight every call, and oneDNN
reorders it each time; a weight reordered once is read at full speed afterwards. For bfloat16 on a
2-core AVX-512 EPYC (30 layers of SmolLM2-135M, projections only): 9.6 → 3.6 ms at 1 row,
17.7 → 10.3 ms at 32 rows, 29.7 → 18.4 ms at 64 rows, 527 → 452 ms at 2,048 rows, with results
equal to `F.linear`'s. Used for bfloat16 weights on CPUs with native bf16 (AVX-512 BF16 or AMX)
where oneDNN is built in.

float32 is packed only where oneDNN's float32 kernel gives every row the same bits whatever the
number of rows, checked once per process on a probe (`_float32_rows_independent`): the float32
identity of batched and unbatched outputs (and of speculative and plain decoding) must hold. On an
AVX-512 EPYC it does not (the previous session's finding), on a 2-core AVX2 EPYC it does, and there
the reorder pays most: 30 layers of projections at 1 row 30.9 → 21.7 ms, 2 rows 51.1 → 22.6 ms,
6 rows 45.7 → 27.9 ms, 16 rows 62.4 → 41.9 ms (plain `F.linear` packs the weight on every call and
is not row-independent there). float16 reorders need AVX-NE-CONVERT or AVX512-FP16, rare here.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

BATCH_HINT = 64  # the reorder is tuned for this many rows; measured equally good from 1 to 2,048


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    from ladle.platform import cpu_features

    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return cpu_features().has_native_bf16
    return dtype == torch.float32 and _float32_rows_independent()


@functools.cache
def _float32_rows_independent() -> bool:
    """Whether oneDNN's packed float32 linear computes each row the same way alone and in batches."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 576, generator=g)
    x = torch.randn(64, 576, generator=g)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)

    def rows(n: int) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x[:n], packed, None, "none", [None], "")

    full = rows(64)
    return all(torch.equal(rows(n), full[:n]) for n in (1, 2, 3, 7, 16, 33))


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [None], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear (the lm_head included: it gets its own reordered copy, the
    embedding keeps the plain one) by a PackedLinear, in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, PackedLinear(child.weight, child.bias))
                count += 1
    return count
