"""Admission verdicts from a model's live load: deterministic, from synthetic snapshots."""

from __future__ import annotations

import pytest

from ladle.config import AdmissionConfig, LatencyTargets, ModelEntry
from ladle.engine.load import LoadSnapshot
from ladle.router.admission import judge, retry_after_s

# a step costs 10 ms + 1 ms per token; 100 tokens a step; 4 requests at once, one finishing a second
LOAD = LoadSnapshot(num_running=2, max_num_batched_tokens=100, max_num_seqs=4, step_base_s=0.01,
                    step_per_token_s=0.001, finished_per_s=1.0)  # fmt: skip
CFG = AdmissionConfig()


def entry(**kw) -> ModelEntry:
    return ModelEntry(name="m", **kw)


def test_a_request_that_fits_its_ttft_target_is_admitted_with_the_prediction():
    v = judge(entry(targets=LatencyTargets(ttft_ms=500)), LOAD, 0, 50, CFG)
    assert v.ok and v.predicted_ttft_s == pytest.approx(0.01 + 0.052) and "within TTFT target 500 ms" in v.reason


def test_a_request_admitted_against_a_ttft_target_must_start_before_the_target_less_its_prefill():
    v = judge(entry(targets=LatencyTargets(ttft_ms=500)), LOAD, 0, 50, CFG)
    assert v.start_within_s == pytest.approx(0.5 - (0.01 + 0.001 * (3 + 50)))  # its prefill beside a full batch
    slow = LoadSnapshot(**{**LOAD.__dict__, "step_period_s": 0.2})  # the steps come slower than the fit says
    assert judge(entry(targets=LatencyTargets(ttft_ms=500)), slow, 0, 50, CFG).start_within_s == pytest.approx(0.3)
    assert judge(entry(targets=LatencyTargets(ttft_ms=500)), LoadSnapshot(), 0, 50, CFG).start_within_s == 0.5
    assert judge(entry(), LOAD, 0, 50, CFG).start_within_s is None  # no target: no start-by
    off = AdmissionConfig(enabled=False)
    assert judge(entry(targets=LatencyTargets(ttft_ms=500)), LOAD, 0, 50, off).start_within_s is None


def test_a_backlog_that_breaks_the_target_is_refused_with_its_excess():
    loaded = LoadSnapshot(**{**LOAD.__dict__, "backlog_tokens": 4900})  # 50 steps of prompt ahead
    v = judge(entry(targets=LatencyTargets(ttft_ms=500)), loaded, 3, 50, CFG)
    assert not v.ok and "predicted TTFT" in v.reason and "> TTFT target 500 ms" in v.reason
    assert v.excess_s == pytest.approx(v.predicted_ttft_s - 0.5)
    assert retry_after_s(v, CFG) == int(-(-v.excess_s // 1))
    assert judge(entry(), loaded, 3, 50, CFG).ok  # no target: the 30 s queue-wait bound holds


def test_without_a_target_the_bound_is_the_predicted_queue_wait():
    huge = LoadSnapshot(**{**LOAD.__dict__, "backlog_tokens": 98 * 400})  # 400 steps of 110 ms: 44 s
    v = judge(entry(), huge, 10, 1, CFG)
    assert not v.ok and "queue-wait bound 30000 ms" in v.reason
    assert judge(entry(), huge, 10, 1, AdmissionConfig(max_queue_wait_s=60)).ok


def test_the_tpot_target_and_the_queue_bounds():
    v = judge(entry(targets=LatencyTargets(tpot_ms=5)), LOAD, 0, 10, CFG)
    assert not v.ok and "predicted TPOT 13 ms > TPOT target 5 ms" in v.reason
    v = judge(entry(max_waiting_requests=3), LOAD, 3, 10, CFG)
    assert not v.ok and "3 requests are already waiting (limit 3)" in v.reason and v.excess_s == 1.0
    v = judge(entry(max_waiting_prompt_tokens=100), LoadSnapshot(**{**LOAD.__dict__, "backlog_tokens": 95}), 1, 10, CFG)
    assert not v.ok and "95 prompt tokens are already waiting (limit 100)" in v.reason


def test_off_or_unmeasured_admits_within_the_queue_bounds():
    loaded = LoadSnapshot(**{**LOAD.__dict__, "backlog_tokens": 10**6})
    assert judge(entry(targets=LatencyTargets(ttft_ms=1)), loaded, 0, 1, AdmissionConfig(enabled=False)).ok
    assert judge(entry(targets=LatencyTargets(ttft_ms=1)), LoadSnapshot(), 0, 1, CFG).ok
    assert not judge(entry(max_waiting_requests=1), loaded, 1, 1, AdmissionConfig(enabled=False)).ok


def test_retry_after_stays_within_its_bounds():
    from ladle.router.admission import Verdict

    assert retry_after_s(Verdict(False, "", 0.2), CFG) == 1
    assert retry_after_s(Verdict(False, "", 7.01), CFG) == 8
    assert retry_after_s(Verdict(False, "", 1e6), CFG) == 60
