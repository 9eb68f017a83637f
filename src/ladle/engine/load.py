"""What an engine's queue holds and what its steps cost, measured as it runs: the numbers the
router predicts a new request's TTFT and TPOT from, and computes Retry-After from.

A step's time is fitted as `base + per_token * tokens` (exponentially weighted least squares over
recent steps, so it follows the machine's load); the time between two steps of the same engine,
over its own step time, says how much other engines on the same ComputeLoop take (1 alone).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

DECAY = 0.97  # weight of the past at each new step (about the last 30 steps count)
PERIOD_DECAY = 0.7  # the step period follows within a few steps (a burst changes it in a second)


@dataclass(frozen=True)
class LoadSnapshot:
    """An engine's load as of its last step; immutable, so any thread may read it."""

    num_running: int = 0  # requests computing
    num_waiting: int = 0  # requests queued (in the scheduler, or on their way to it)
    backlog_tokens: int = 0  # prompt tokens not computed yet, of waiting and partly prefilled requests
    max_num_batched_tokens: int = 2048  # the engine's token budget per step
    max_num_seqs: int = 64  # requests it runs at once
    step_base_s: float | None = None  # fitted step time at zero tokens; None before any step
    step_per_token_s: float = 0.0  # fitted step time per computed token
    period_ratio: float = 1.0  # time between this engine's steps over its own step time
    finished_per_s: float = 0.0  # requests finishing per second while busy
    step_period_s: float = 0.0  # recent time between this engine's steps while busy (others' steps included)
    running_left: tuple[int, ...] = ()  # decode steps each running request is expected to need still
    waiting_outputs: tuple[int, ...] = ()  # expected output tokens of the waiting ones, in queue order

    @property
    def is_measured(self) -> bool:
        return self.step_base_s is not None

    def step_s(self, tokens: int) -> float:
        """Wall time of one of this engine's steps computing `tokens`, others' steps included."""
        return ((self.step_base_s or 0.0) + self.step_per_token_s * tokens) * self.period_ratio

    @property
    def prefill_tokens_per_step(self) -> int:
        return max(1, self.max_num_batched_tokens - self.num_running)

    def predict_ttft_s(self, prompt_tokens: int) -> float:
        """A new request's time to first token: the prompt tokens ahead of it and its own, at the
        budget left beside the running decodes, plus the wait for a free slot if all are taken."""
        return self.prefill_s(self.backlog_tokens + prompt_tokens, self.num_running) + self.slot_wait_s()

    def prefill_s(self, tokens: int, num_running: int) -> float:
        """Time to compute `tokens` of prompt beside num_running decodes."""
        steps = max(1, math.ceil(tokens / self.prefill_tokens_per_step))
        per_step = min(self.max_num_batched_tokens, num_running + math.ceil(tokens / steps))
        return steps * self.step_s(per_step)

    def start_within_s(self, bound_s: float, prompt_tokens: int) -> float:
        """How soon a request must start computing to see its first token within bound_s: the
        bound less its own prefill, beside a full batch, at the slower of the fit and the recent
        period (a request the prediction misjudged waits in the queue past this; it is not served
        late but dropped, the bound is kept)."""
        own = self.prefill_s(prompt_tokens, self.max_num_seqs - 1)
        steps = max(1, math.ceil(prompt_tokens / self.prefill_tokens_per_step))
        return bound_s - max(own, steps * self.step_period_s)

    def slot_wait_s(self) -> float:
        """How long a request queued behind every waiting one waits for a free slot: the running
        requests' expected remaining decodes and the waiting ones' outputs laid on max_num_seqs
        slots, each waiting request taking the slot that frees first. (A finishing rate would say
        a slot frees every 1/rate seconds; a full batch that started together frees none until it
        has run its course, which is what a burst makes.)"""
        queue = list(self.waiting_outputs)
        known = queue or list(self.running_left) or [1]
        queue += [round(sum(known) / len(known))] * max(0, self.num_waiting - len(queue))  # not in the scheduler yet
        if self.num_running + len(queue) < self.max_num_seqs:
            return 0.0
        slots = sorted([*self.running_left, *[0] * max(0, self.max_num_seqs - len(self.running_left))])
        for out in queue:  # a sorted list is a heap
            heapq.heapreplace(slots, slots[0] + out)
        # at a full batch; the recent period where it is longer (a full batch's steps carry the
        # newcomers' prefill chunks, and other engines on the loop step in between)
        return slots[0] * max(self.step_s(self.max_num_seqs), self.step_period_s)

    def predict_tpot_s(self) -> float:
        """Time per output token once one more request decodes beside the running ones."""
        return self.step_s(min(self.num_running + 1, self.max_num_seqs))

    @property
    def drain_tokens_per_s(self) -> float:
        """Prompt tokens of the backlog computed per second."""
        step = self.step_s(self.max_num_batched_tokens)
        return self.prefill_tokens_per_step / step if step > 0 else 0.0


class LoadTracker:
    """Fits step times as the engine runs (on the loop thread) and publishes LoadSnapshots."""

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int):
        self._budget, self._seqs = max_num_batched_tokens, max_num_seqs
        self._s = [0.0] * 5  # weighted sums: n, x, y, xx, xy (x tokens, y seconds)
        self._ratio = 1.0
        self._period_s = 0.0
        self._finished_per_s = 0.0
        self.natural_output_tokens: float | None = None  # mean length of requests that stopped on their own
        self._last_start_s: float | None = None
        self._last_duration_s = 0.0
        self.snapshot = LoadSnapshot(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)

    def observe_step(self, started_s: float, ended_s: float, tokens: int, num_finished: int) -> None:
        duration = max(ended_s - started_s, 1e-6)
        n, sx, sy, sxx, sxy = (v * DECAY for v in self._s)
        self._s = [n + 1, sx + tokens, sy + duration, sxx + tokens * tokens, sxy + tokens * duration]
        if self._last_start_s is not None:  # busy since the last step: the gap shows the others' steps
            period = started_s - self._last_start_s
            ratio = max(1.0, period / max(self._last_duration_s, 1e-6))
            self._ratio = DECAY * self._ratio + (1 - DECAY) * ratio
            self._period_s = PERIOD_DECAY * self._period_s + (1 - PERIOD_DECAY) * period
            rate = num_finished / max(period, 1e-6)
            self._finished_per_s = DECAY * self._finished_per_s + (1 - DECAY) * rate
        self._last_start_s, self._last_duration_s = started_s, duration

    def observe_stop(self, num_output_tokens: int) -> None:
        """A request ended on a stop token or string after num_output_tokens."""
        mean = self.natural_output_tokens
        self.natural_output_tokens = num_output_tokens if mean is None else 0.9 * mean + 0.1 * num_output_tokens

    def expected_left(self, max_output_tokens: int, generated: int, ignore_eos: bool) -> int:
        """Output tokens a request is expected to need still: its budget, or, where it may stop on
        its own, no more than the mean length of those that did."""
        budget = max_output_tokens - generated
        if not ignore_eos and self.natural_output_tokens is not None:
            budget = min(budget, round(self.natural_output_tokens) - generated)
        return max(1, budget)

    def idle(self) -> None:
        """The engine has nothing to do: the next step's gap is not a period."""
        self._last_start_s = None

    def publish(self, num_running: int, num_waiting: int, backlog_tokens: int, running_left: tuple[int, ...] = (),
                waiting_outputs: tuple[int, ...] = ()) -> LoadSnapshot:  # fmt: skip
        base, per_token = self._fit()
        self.snapshot = LoadSnapshot(
            num_running, num_waiting, backlog_tokens, self._budget, self._seqs, base, per_token,
            self._ratio, self._finished_per_s, self._period_s, running_left, waiting_outputs,
        )  # fmt: skip
        return self.snapshot

    def _fit(self) -> tuple[float | None, float]:
        n, sx, sy, sxx, sxy = self._s
        if n <= 0:
            return None, 0.0
        det = n * sxx - sx * sx
        per_token = (n * sxy - sx * sy) / det if det > 1e-9 * max(1.0, n * sxx) else 0.0
        per_token = max(per_token, 0.0)
        base = max((sy - per_token * sx) / n, 0.0)
        return base, per_token
