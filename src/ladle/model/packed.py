"""Linear layers with their weights reordered once, at load, into oneDNN's blocked layout.

PyTorch's `F.linear` on a CPU hands oneDNN the plain [out, in] weight every call, and oneDNN
reorders it each time; a weight reordered once is read at full speed afterwards. For bfloat16 on a
2-core AVX-512 EPYC (30 layers of SmolLM2-135M, projections only): 9.6 → 3.6 ms at 1 row,
17.7 → 10.3 ms at 32 rows, 29.7 → 18.4 ms at 64 rows, 527 → 452 ms at 2,048 rows, with results
equal to `F.linear`'s. Used for bfloat16 weights on CPUs with native bf16 (AVX-512 BF16 or AMX)
where oneDNN is built in.

Every row's result must not depend on how many rows share the call: that is what makes a
request's tokens the same alone and in any batch, chunked or not, speculating or not. oneDNN does
not give it for free: it picks its kernel and blocking by the shape. So each weight shape is probed
once per process (`row_plan`) for a way of shaping the calls that gives every row the same bits:
- on a 2-core Zen 5 EPYC (AVX-512 BF16, no AMX) any row count does, except that the down
  projection of SmolLM2 (K = 1,536) gives other bits in a call of one row: calls of fewer rows than
  `min_rows` (2 there, found among 1-16) are padded with zero rows (35.6 -> 38.9 us at one row);
- on a 2-core Xeon with AMX, oneDNN splits bfloat16 work by the row count in ways that round
  differently: calls of 1-32 rows and most counts from 512 up agree, 33-256 rows and some larger
  counts do not (and the classes differ by shape). There no padding of small calls helps; instead
  calls take only `counts`, a set of row counts probed to agree (from 1-64, then multiples of 32
  up to `LADDER_MAX_ROWS`, fewer for a weight as large as the lm_head); of the sets that agree,
  the one whose calls are fastest over a range of step sizes is kept. A call is padded up to the
  next count, and a larger one split into calls of the largest. For SmolLM2's projections the
  chosen set is 1-32 (calls of a few rows as they are) and the agreeing multiples of 32 to 2,048;
  for its lm_head, 33-64 and 96-128 (so sampling one row computes 33). The plans are probed once
  per machine (a few seconds) and kept on disk beside w8a8's calibration.
A shape with neither (none seen) keeps plain `nn.Linear`, and a warning says so.
float16 reorders need AVX-NE-CONVERT or AVX512-FP16, rare here.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 64  # the reorder is tuned for this many rows; measured equally good from 1 to 2,048


MAX_PAD_ROWS = 16  # pad a call to at most this many rows where every larger count agrees
PROBE_ROWS = 256  # rows of the probe: every row is compared at every row count
PROBE_SMALL_CALL = 16  # calls of at most this many rows are checked on the first PROBE_SMALL_ROWS rows only
PROBE_COUNTS = (*range(1, PROBE_SMALL_CALL + 1), 24, 31, 33, 64, 127)  # row counts compared with PROBE_ROWS'
PROBE_SMALL_ROWS = 48  # (each small call reads the whole weight: the lm_head's probe would take seconds)
LADDER_MAX_ROWS = 2048  # the largest call of a ladder (the default step budget); larger calls are split
LADDER_MAX_MACS = 1 << 32  # ... or fewer, so that one call is at most this many multiply-adds (the lm_head's)
LADDER_FIRST = range(1, 65)  # where the ladder's smallest count is looked for
LADDER_STEP = 32  # the ladder's counts above its smallest: multiples of this


@dataclass(frozen=True)
class RowPlan:
    """How the calls of one packed linear are shaped so that no row's bits depend on the call."""

    min_rows: int = 1  # calls of fewer rows are padded with zero rows to this many
    counts: tuple[int, ...] = ()  # if set, the only row counts a call takes (ascending; see the module)

    @property
    def max_native_rows(self) -> int | None:
        """The most rows a call may have when calls of min_rows and more are taken as they are (the
        top of the run of counts from min_rows up); None: any number."""
        if not self.counts:
            return None
        top = self.min_rows
        while top + 1 in self.counts:
            top += 1
        return top

    def calls(self, n: int) -> list[tuple[int, int, int]]:
        """(first row, rows, rows with the padding) of each call that computes n rows."""
        if not self.counts:
            return [(0, n, max(n, self.min_rows))]
        largest = self.counts[-1]
        out = []
        for start in range(0, n, largest):
            rows = min(largest, n - start)
            out.append((start, rows, next(c for c in self.counts if c >= rows)))
        return out


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
def row_plan(dtype: torch.dtype, out_features: int, in_features: int) -> RowPlan | None:
    """How calls of oneDNN's packed linear of this shape must be shaped so that each row gets the
    same bits in any call (probed on seeded random data: the kernel oneDNN picks depends on the
    shapes, not the values); None where neither padding nor a ladder gives it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(max(PROBE_ROWS, LADDER_MAX_ROWS), in_features, generator=g).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
    min_rows = _min_invariant_rows(packed, x[:PROBE_ROWS])
    if min_rows is not None:
        return RowPlan(min_rows)
    affordable = LADDER_MAX_MACS // (out_features * in_features) // LADDER_STEP * LADDER_STEP
    return _ladder(packed, x[: max(LADDER_FIRST.stop - 1 + LADDER_STEP, min(LADDER_MAX_ROWS, affordable))])


def _computed(packed: torch.Tensor, x: torch.Tensor, call_rows: int, pad_to: int) -> torch.Tensor:
    """x's rows in calls of call_rows rows, each padded with zero rows to pad_to."""
    parts = []
    for start in range(0, len(x), call_rows):
        rows = x[start : start + call_rows]
        k = len(rows)
        if k < pad_to:
            rows = torch.cat([rows, rows.new_zeros(pad_to - k, x.shape[1])])
        parts.append(packed_linear(rows, packed, None)[:k])
    return torch.cat(parts)


def _min_invariant_rows(packed: torch.Tensor, x: torch.Tensor) -> int | None:
    """The fewest rows m (up to MAX_PAD_ROWS) such that calls of any row count, padded to m rows
    where fewer, give every row the bits of one call of all of x's rows."""
    full = packed_linear(x, packed, None)

    def agrees(n: int, pad_to: int) -> bool:
        rows = len(x) if n > PROBE_SMALL_CALL else PROBE_SMALL_ROWS
        return torch.equal(_computed(packed, x[:rows], n, pad_to), full[:rows])

    if not agrees(MAX_PAD_ROWS, MAX_PAD_ROWS):  # calls of that many rows disagree: no padding up to it helps
        return None
    for m in range(1, MAX_PAD_ROWS + 1):
        if all(agrees(n, m) for n in PROBE_COUNTS):
            return m
    return None


def _ladder(packed: torch.Tensor, x: torch.Tensor) -> RowPlan | None:
    """The largest set of row counts whose calls give every row the same bits: candidates are
    LADDER_FIRST and the multiples of LADDER_STEP up to LADDER_MAX_ROWS, grouped by the bits they
    give (the small ones on the first rows, the larger ones on all rows, a partial last call
    padded); the group must hold a count from LADDER_FIRST, for the calls of a few rows."""
    head = LADDER_FIRST.stop - 1
    small = {m: _computed(packed, x[:head], m, m) for m in LADDER_FIRST}
    large = {c: _computed(packed, x, c, c) for c in range(LADDER_FIRST.stop - 1 + LADDER_STEP, len(x) + 1, LADDER_STEP)}
    groups: list[tuple[list[int], torch.Tensor | None]] = []  # (counts, all rows of the group's large calls)
    for count, out in [*small.items(), *large.items()]:
        for counts, rows in groups:
            first = small.get(counts[0], large.get(counts[0]))
            if not torch.equal(out[:head], first[:head]):
                continue
            if count in large and rows is not None and not torch.equal(out, rows):
                continue
            counts.append(count)
            if count in large and rows is None:
                groups[groups.index((counts, rows))] = (counts, out)
            break
        else:
            groups.append(([count], out if count in large else None))
    usable = [RowPlan(counts[0], tuple(counts)) for counts, _ in groups if counts[0] in LADDER_FIRST]
    if len(usable) <= 1:
        return usable[0] if usable else None
    return min(usable, key=lambda plan: (_measured_cost(packed, x, plan), plan.min_rows))


LADDER_SIZES = (1, 8, 32, 64, 128, 256, 512, 1024, 2048)  # step sizes a ladder is timed at


def _measured_cost(packed: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> float:
    """Seconds per row of calls shaped by the plan, summed over LADDER_SIZES rows (up to the
    probe's rows): which of several correct ladders is fastest here. Only the speed depends on
    the timing; every candidate gives every row the same bits."""
    import time

    layer = PackedLinear.__new__(PackedLinear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features, layer.plan = x.shape[1], packed.shape[0], plan
    layer.packed_weight, layer.bias = packed, None
    total = 0.0
    for m in (m for m in LADDER_SIZES if m <= len(x)):
        rows = x[:m]
        layer(rows)  # oneDNN builds its kernels for these shapes
        started = time.perf_counter()
        for _ in range(3):
            layer(rows)
        total += (time.perf_counter() - started) / 3 / m
    return total


class PackedLinear(nn.Module):
    """A linear layer on oneDNN's reordered weight whose rows do not depend on the batch: each call
    shaped as its RowPlan says (see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: RowPlan = RowPlan()):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.plan = plan
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        calls = self.plan.calls(rows.shape[0])
        if len(calls) == 1:
            out = self._call(rows, calls[0][2])
        else:
            out = torch.cat([self._call(rows[start : start + n], padded) for start, n, padded in calls])
        return out.view(*x.shape[:-1], self.out_features)

    def _call(self, rows: torch.Tensor, padded: int) -> torch.Tensor:
        n = rows.shape[0]
        if n < padded:
            rows = torch.cat([rows, rows.new_zeros(padded - n, self.in_features)])
        return packed_linear(rows, self.packed_weight, self.bias)[:n]


def pack_linears(model: nn.Module, cache_dir: str | None = None, between: Callable[[], object] | None = None) -> int:
    """Replace every plain nn.Linear (the lm_head included: it gets its own reordered copy, the
    embedding keeps the plain one) whose shape has a row-invariant form by a PackedLinear, in
    place; returns how many. cache_dir: where the probed plans are kept between loads, per
    machine, PyTorch and thread count (None: probed at every load). between: called after each."""
    plans = _PlanCache(cache_dir)
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            plan = plans.get(child.weight.dtype, child.out_features, child.in_features)
            if plan is None:
                log.warning(
                    "oneDNN's %s linear %dx%d gives rows that depend on the batch however its calls are shaped: "
                    "kept as nn.Linear, so outputs may differ with what else is batched",
                    child.weight.dtype, child.out_features, child.in_features,
                )  # fmt: skip
                continue
            setattr(module, child_name, PackedLinear(child.weight, child.bias, plan))
            count += 1
            if between is not None:
                between()
    plans.save()
    return count


PLAN_FORMAT = 1  # bump when the probe changes what a plan means


class _PlanCache:
    """Probed RowPlans on disk: a JSON file per (CPU, PyTorch, threads) in cache_dir."""

    def __init__(self, cache_dir: str | None):
        self.path = None
        self.plans: dict[str, RowPlan | None] = {}
        self.dirty = False
        if cache_dir is None:
            return
        import hashlib
        import platform

        from ladle.platform import cpu_model_name

        key = f"{PLAN_FORMAT}|{cpu_model_name()}|{platform.machine()}|{torch.__version__}|{torch.get_num_threads()}"
        name = f"row-plans-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        self.path = Path(cache_dir).expanduser() / name
        try:
            raw = json.loads(self.path.read_text())
            self.plans = {k: None if v is None else RowPlan(v[0], tuple(v[1])) for k, v in raw.items()}
        except (OSError, ValueError, TypeError, IndexError):
            self.plans = {}

    def get(self, dtype: torch.dtype, out_features: int, in_features: int) -> RowPlan | None:
        key = f"{str(dtype).removeprefix('torch.')}:{out_features}x{in_features}"
        if key not in self.plans:
            self.plans[key] = row_plan(dtype, out_features, in_features)
            self.dirty = True
        return self.plans[key]

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        raw = {k: None if p is None else [p.min_rows, list(p.counts)] for k, p in self.plans.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(raw))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not keep the probed row plans in %s: %s", self.path, e)
