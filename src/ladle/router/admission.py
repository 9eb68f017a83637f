"""Admission against latency targets: will a new request meet its model's targets if queued now?

From the endpoint's live LoadSnapshot (prefill rate, step time, backlog, running requests), the
request's TTFT is predicted, and its TPOT at the batch it would join. The bound is the model's
TTFT target (P95 goal) or, without one, `max_queue_wait_s`; the TPOT target where one is set; and
always the per-model queue bounds (requests and prompt tokens). A verdict that breaks a bound
says by how much, in seconds of backlog at the measured drain rate: the Retry-After.

A request admitted against a TTFT target is given the time by which it must start computing (the
target less its own prefill): one the prediction misjudged is dropped from the queue then and
answered 429 with Retry-After, never served late.
"""

from __future__ import annotations

from dataclasses import dataclass

from ladle.config import AdmissionConfig, ModelEntry
from ladle.engine.load import LoadSnapshot


@dataclass(frozen=True)
class Verdict:
    ok: bool  # the request may be queued on this endpoint
    reason: str  # what the prediction was, against which bound
    excess_s: float = 0.0  # how long until it would fit (the backlog over the bound, drained at the measured rate)
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    start_within_s: float | None = None  # where a TTFT target holds: it must start computing this soon


def judge(entry: ModelEntry, load: LoadSnapshot | None, num_waiting: int, prompt_tokens: int,
          cfg: AdmissionConfig) -> Verdict:  # fmt: skip
    """Whether a request of prompt_tokens fits on the model now."""
    if num_waiting >= entry.max_waiting_requests:
        return Verdict(False, f"{num_waiting} requests are already waiting (limit {entry.max_waiting_requests})",
                       _slots_excess(load, num_waiting + 1 - entry.max_waiting_requests))  # fmt: skip
    if load is not None and load.backlog_tokens + prompt_tokens > entry.max_waiting_prompt_tokens:
        excess = load.backlog_tokens + prompt_tokens - entry.max_waiting_prompt_tokens
        rate = load.drain_tokens_per_s
        return Verdict(False, f"{load.backlog_tokens} prompt tokens are already waiting "
                       f"(limit {entry.max_waiting_prompt_tokens})", excess / rate if rate > 0 else 0.0)  # fmt: skip
    if not cfg.enabled:
        return Verdict(True, "admission off")
    if load is None or not load.is_measured:
        target = entry.targets.ttft_ms
        return Verdict(True, "admitted (nothing measured yet)", start_within_s=target / 1e3 if target else None)
    ttft, tpot = load.predict_ttft_s(prompt_tokens), load.predict_tpot_s()
    targets = entry.targets
    bound_s = targets.ttft_ms / 1e3 if targets.ttft_ms is not None else cfg.max_queue_wait_s
    what = "TTFT target" if targets.ttft_ms is not None else "queue-wait bound"
    if ttft > bound_s:
        return Verdict(False, f"predicted TTFT {ttft * 1e3:.0f} ms > {what} {bound_s * 1e3:.0f} ms",
                       ttft - bound_s, ttft, tpot)  # fmt: skip
    if targets.tpot_ms is not None and tpot > targets.tpot_ms / 1e3:
        return Verdict(False, f"predicted TPOT {tpot * 1e3:.0f} ms > TPOT target {targets.tpot_ms:.0f} ms",
                       _slots_excess(load, 1), ttft, tpot)  # fmt: skip
    start_within_s = load.start_within_s(bound_s, prompt_tokens) if targets.ttft_ms is not None else None
    return Verdict(True, f"predicted TTFT {ttft * 1e3:.0f} ms within {what} {bound_s * 1e3:.0f} ms", 0.0, ttft, tpot,
                   start_within_s)  # fmt: skip


def _slots_excess(load: LoadSnapshot | None, num_requests: int) -> float:
    """Time for num_requests to finish at the measured rate."""
    if load is None or load.finished_per_s <= 0:
        return 0.0
    return num_requests / load.finished_per_s


def retry_after_s(verdict: Verdict, cfg: AdmissionConfig) -> int:
    """Whole seconds, within the configured bounds."""
    return int(min(cfg.max_retry_after_s, max(cfg.min_retry_after_s, -(-verdict.excess_s // 1))))
