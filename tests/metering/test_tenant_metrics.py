"""Per-tenant Prometheus series: requests, tokens and quota refusals, the tenant label bounded to the
configured tenants; and ServerState.reserve_quota's 429."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from ladle.metering.prometheus import ServerMetrics, TenantLabels, TenantMetricsSink
from ladle.metering.quotas import Limiter
from ladle.metering.tenants import Principal, Quota, Tenant, TenantDirectory
from ladle.server.errors import APIError
from ladle.server.state import ServerState
from quota_helpers import row


def sample(metrics: ServerMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_rows_count_by_tenant_model_and_outcome():
    metrics = ServerMetrics()
    labels = TenantLabels(lambda t: t in {"a", "b"})
    sink = TenantMetricsSink(metrics, labels)
    sink.record(row("r1", "a", 10, 5))
    sink.record(row("r2", "a", 7, 0))
    sink.record(row("r3", "gone", 3, 3))  # a tenant deleted since: "other"
    sink.record(row("r4", "default", 1, 1))
    assert sample(metrics, "ladle_tenant_requests_total", tenant="a", model_name="m", outcome="served") == 2
    assert sample(metrics, "ladle_tenant_tokens_total", tenant="a", model_name="m", kind="prompt") == 17
    assert sample(metrics, "ladle_tenant_tokens_total", tenant="a", model_name="m", kind="completion") == 5
    assert sample(metrics, "ladle_tenant_requests_total", tenant="other", model_name="m", outcome="served") == 1
    assert sample(metrics, "ladle_tenant_requests_total", tenant="default", model_name="m", outcome="served") == 1
    text = generate_latest(metrics.registry).decode()
    assert 'tenant="gone"' not in text


def _state(directory: TenantDirectory) -> ServerState:
    return ServerState(config=None, metrics=ServerMetrics(), registry=None, router=None, directory=directory,
                       limiter=Limiter())  # fmt: skip


def test_reserve_quota_is_a_429_with_retry_after_naming_the_limit():
    a = Tenant("a", quota=Quota(requests_per_minute=1))
    state = _state(TenantDirectory([a]))
    state.reserve_quota(Principal(a, "key_1"), "r1", 0)
    with pytest.raises(APIError) as e:
        state.reserve_quota(Principal(a, "key_1"), "r2", 0)
    err = e.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert 1 <= int(err.headers["Retry-After"]) <= 60
    assert "tenant `a` is over its requests_per_minute limit of 1" in err.message
    assert sample(state.metrics, "ladle_quota_rejections_total", tenant="a", limit="requests_per_minute") == 1
    assert err.anthropic_body()["error"]["type"] == "rate_limit_error"  # /v1/messages answers in its format


def test_a_tenant_not_in_the_directory_is_labelled_other():
    b = Tenant("b", quota=Quota(requests_per_minute=1))
    state = _state(TenantDirectory([Tenant("a")]))
    state.reserve_quota(Principal(b, None), "r1", 0)
    with pytest.raises(APIError):
        state.reserve_quota(Principal(b, None), "r2", 0)
    assert sample(state.metrics, "ladle_quota_rejections_total", tenant="other", limit="requests_per_minute") == 1
