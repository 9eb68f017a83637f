"""The Meter alone: one row per request, its outcome from the status and the route, zero tokens
for an error, the tokens handed on for a client that left, the cost from the price table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ladle.config import LadleConfig, MeteringConfig, PriceConfig
from ladle.engine.outputs import RequestMetrics, RequestOutput
from ladle.metering.tenants import Principal, Tenant
from ladle.server.accounting import Meter, Usage
from ladle.server.errors import APIError

PRICES = (PriceConfig("small", prompt_per_1k=1.0, cached_per_1k=0.5, completion_per_1k=2.0, per_engine_second=10.0),)


def meter(models=()) -> tuple[Meter, list]:
    rows = []
    state = SimpleNamespace(
        config=LadleConfig(metering=MeteringConfig(prices=PRICES)),
        registry=SimpleNamespace(default_name="small"),
        record_usage=rows.append,
    )
    principal = Principal(Tenant("team-a", models=models), "key_1")
    request = SimpleNamespace(scope={"state": {"request_id": "r1", "principal": principal}})
    return Meter(state, request, "/v1/completions"), rows


def out(index, tokens, finished=False, engine_s=0.0) -> RequestOutput:
    metrics = RequestMetrics(10.0, 10.25, 10.5, 11.0, 0, engine_s) if finished else None
    reason = "length" if finished else None
    return RequestOutput("j", index, tokens, "", finished, reason, metrics=metrics)


def test_a_served_request_counts_its_usage_timings_and_cost():
    m, rows = meter()
    m.requesting("small")
    m.routed(SimpleNamespace(name="small", outcome="degraded"))
    m.usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400)
    for i in (0, 1):
        m.observe(i, out(i, [1, 2]))
        m.observe(i, out(i, [], finished=True, engine_s=0.5))
    row = m.finish(200)
    assert rows == [row] and m.finish(200) is None  # once
    assert (row.tenant, row.key_id, row.model_requested, row.model) == ("team-a", "key_1", "small", "small")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (1000, 400, 500)
    assert (row.status, row.outcome, row.finish_reason) == (200, "degraded", "length")
    assert row.engine_s == 1.0 and row.queue_s == 0.25 and row.ttft_s is not None
    assert row.cost == pytest.approx(600 * 1 / 1000 + 400 * 0.5 / 1000 + 500 * 2 / 1000 + 1.0 * 10)


@pytest.mark.parametrize(
    ("status", "failed_in_stream", "outcome", "tokens"),
    [(499, False, "aborted", 3), (429, False, "rejected", 0), (403, False, "rejected", 0),
     (503, False, "failed", 0), (200, True, "failed", 3)],
)  # fmt: skip
def test_the_outcome_and_tokens_follow_the_status(status, failed_in_stream, outcome, tokens):
    m, _ = meter()
    m.routed(SimpleNamespace(name="small", outcome="served"))
    m.usage = Usage(prompt_tokens=2, completion_tokens=1)
    if failed_in_stream:
        m.failed(APIError(503, "engine failed"))
    row = m.finish(status)
    assert (row.status, row.outcome, row.prompt_tokens + row.completion_tokens) == (status, outcome, tokens)
    assert row.finish_reason == ("abort" if status == 499 else None)


def test_a_model_outside_the_tenants_list_is_refused_by_its_name_or_as_the_default():
    m, _ = meter(models=("big",))
    m.requesting("big")
    for name in ("small", None):  # None: the default model, small
        with pytest.raises(APIError) as e:
            m.requesting(name)
        assert e.value.status == 403 and e.value.code == "model_not_allowed"
        assert "may not use the model `small`" in e.value.message
