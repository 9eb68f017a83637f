"""Linear layers with their weights reordered once, at load, into oneDNN's blocked layout.

PyTorch's `F.linear` on a CPU hands oneDNN the plain [out, in] weight every call, and oneDNN
reorders it each time; a weight reordered once is read at full speed afterwards. For bfloat16 on a
2-core AVX-512 EPYC (30 layers of SmolLM2-135M, projections only): 9.6 → 3.6 ms at 1 row,
17.7 → 10.3 ms at 32 rows, 29.7 → 18.4 ms at 64 rows, 527 → 452 ms at 2,048 rows, with results
equal to `F.linear`'s. Used for bfloat16 weights on CPUs with native bf16 (AVX-512 BF16 or AMX)
where oneDNN is built in.

Every row's result must not depend on how many rows share the call: that is what makes a
request's tokens the same alone and in any batch, chunked or not, speculating or not. oneDNN does
not give it for free: it picks its blocking by the shape, and on a 2-core Zen 5 EPYC (AVX-512 BF16)
the down projection of SmolLM2 (K = 1,536) gives a row other bits in a call of one row than in a
call of several (in bfloat16 and float32), while K = 576 gives the same bits at any count.
So each weight shape is probed once per process (`min_invariant_rows`): the fewest rows `m`
such that calls of any row count, padded to `m` rows where fewer, give every row the bits of one
call of `PROBE_ROWS` rows (checked at 1-16 rows on the first 48 rows, at 24 to 127 on all of
them). A call with fewer rows is padded with zero rows up to that count (the down projection
needs 2 here in both dtypes: 35.6 -> 38.9 us at one row in bfloat16; no cost where the minimum
is 1). A shape with no such count within `MAX_PAD_ROWS` (none seen) keeps plain `nn.Linear`, and
a warning says so.
float16 reorders need AVX-NE-CONVERT or AVX512-FP16, rare here.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 64  # the reorder is tuned for this many rows; measured equally good from 1 to 2,048


MAX_PAD_ROWS = 16  # pad a call to at most this many rows; beyond it the shape is not packed
PROBE_ROWS = 256  # rows of the probe: every row is compared at every row count
PROBE_SMALL_CALL = 16  # calls of at most this many rows are checked on the first PROBE_SMALL_ROWS rows only
PROBE_COUNTS = (*range(1, PROBE_SMALL_CALL + 1), 24, 31, 33, 64, 127)  # row counts compared with PROBE_ROWS'
PROBE_SMALL_ROWS = 48  # (each small call reads the whole weight: the lm_head's probe would take seconds)


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    from ladle.platform import cpu_features

    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return cpu_features().has_native_bf16
    return dtype == torch.float32


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on a reordered weight, as the model calls it: x [M, K] -> [M, N]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [None], "")


@functools.cache
def min_invariant_rows(dtype: torch.dtype, out_features: int, in_features: int) -> int | None:
    """The fewest rows from which oneDNN's packed linear of this shape gives each row the same bits
    at any row count (probed on seeded random data: the kernel oneDNN picks depends on the shapes,
    not the values); None where no count up to MAX_PAD_ROWS does."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(PROBE_ROWS, in_features, generator=g).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
    full = packed_linear(x, packed, None)

    def agrees(n: int, pad_to: int) -> bool:  # every row, in calls of n rows padded to pad_to
        for start in range(0, PROBE_ROWS if n > PROBE_SMALL_CALL else PROBE_SMALL_ROWS, n):
            rows = x[start : start + n]
            k = len(rows)
            if k < pad_to:
                rows = torch.cat([rows, rows.new_zeros(pad_to - k, in_features)])
            if not torch.equal(packed_linear(rows, packed, None)[:k], full[start : start + k]):
                return False
        return True

    for m in range(1, MAX_PAD_ROWS + 1):
        if all(agrees(n, m) for n in PROBE_COUNTS):
            return m
    return None


class PackedLinear(nn.Module):
    """A linear layer on oneDNN's reordered weight whose rows do not depend on the batch: calls
    with fewer than `min_rows` rows are padded with zero rows (see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, min_rows: int = 1):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.min_rows = min_rows
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        if n < self.min_rows:
            rows = torch.cat([rows, rows.new_zeros(self.min_rows - n, self.in_features)])
        out = packed_linear(rows, self.packed_weight, self.bias)[:n]
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear (the lm_head included: it gets its own reordered copy, the
    embedding keeps the plain one) whose shape has a row-invariant form by a PackedLinear, in
    place; returns how many."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            min_rows = min_invariant_rows(child.weight.dtype, child.out_features, child.in_features)
            if min_rows is None:
                log.warning(
                    "oneDNN's %s linear %dx%d gives rows that depend on the batch at every row count up to %d: "
                    "kept as nn.Linear, so outputs may differ with what else is batched",
                    child.weight.dtype, child.out_features, child.in_features, MAX_PAD_ROWS,
                )  # fmt: skip
                continue
            setattr(module, child_name, PackedLinear(child.weight, child.bias, min_rows))
            count += 1
    return count
