"""GET /v1/usage in process: rows recorded through the server's ledger, reported per group and
bucket; a tenant's key sees its own rows only; bad parameters are 400s naming the parameter."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from helpers import ADMIN, metered_state
from ladle.metering.usage import UsageRecord
from ladle.server.app import build_app

T0 = 1_800_000_000.0 - (1_800_000_000.0 % 86400)  # a UTC midnight: 2027-01-15T00:00:00Z


def row(time_s, tenant, model="tiny", prompt=10, completion=5, key_id=None):
    return UsageRecord(time_s=time_s, request_id=f"r{time_s}", tenant=tenant, key_id=key_id, api="/v1/completions",
                       model_requested=model, model=model, prompt_tokens=prompt, cached_tokens=2,
                       completion_tokens=completion, queue_s=0.0, ttft_s=0.1, duration_s=0.2, engine_s=0.05,
                       finish_reason="length", status=200, outcome="served", cost=0.125)  # fmt: skip


@pytest.fixture
def setup(tmp_path):
    """A server state with tenants a and b, a key of each, and rows of both in its ledger."""
    state = metered_state(tmp_path / "data")
    client = TestClient(build_app(state))
    keys = {}
    for tenant in ("a", "b"):
        assert client.post("/admin/tenants", json={"id": tenant}, headers=ADMIN).status_code == 201
        keys[tenant] = client.post(f"/admin/tenants/{tenant}/keys", json={}, headers=ADMIN).json()["key"]
    for i, (tenant, hour) in enumerate([("a", 0), ("a", 0), ("a", 1), ("b", 0), ("b", 25)]):
        state.record_usage(row(T0 + hour * 3600 + i, tenant, model="tiny" if i % 2 else "big"))
    yield state, client, {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}
    state.close_sinks()


def get(client, headers, **params):
    return client.get("/v1/usage", params={"start": "2027-01-15T00:00:00Z", "end": str(T0 + 3 * 86400), **params},
                      headers=headers)  # fmt: skip


def test_the_admin_sees_every_tenant_in_the_documented_format(setup):
    state, client, _ = setup  # the rows are still in the ledger's queue: the API flushes it
    r = get(client, ADMIN, group_by="tenant", granularity="day")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["object"], body["granularity"], body["group_by"]) == ("list", "day", ["tenant"])
    assert body["start"] == "2027-01-15T00:00:00Z" and body["end"] == "2027-01-18T00:00:00Z"
    assert [(d["bucket"], d["tenant"], d["requests"]) for d in body["data"]] == [
        ("2027-01-15T00:00:00Z", "a", 3), ("2027-01-15T00:00:00Z", "b", 1), ("2027-01-16T00:00:00Z", "b", 1),
    ]  # fmt: skip
    first = body["data"][0]
    assert (first["prompt_tokens"], first["cached_tokens"], first["completion_tokens"], first["total_tokens"]) == (
        30, 6, 15, 45)  # fmt: skip
    assert first["engine_s"] == pytest.approx(0.15) and first["cost"] == pytest.approx(0.375)
    by_model = get(client, ADMIN, tenant="a").json()
    assert by_model["granularity"] is None and by_model["group_by"] == ["tenant", "model"]
    assert [(d["bucket"], d["tenant"], d["model"], d["requests"]) for d in by_model["data"]] == [
        (None, "a", "big", 2), (None, "a", "tiny", 1),
    ]  # fmt: skip
    hourly = get(client, ADMIN, group_by="", granularity="hour", end="2027-01-15T02:00:00").json()["data"]
    assert [(d["bucket"], d["requests"]) for d in hourly] == [("2027-01-15T00:00:00Z", 3), ("2027-01-15T01:00:00Z", 1)]


def test_a_tenants_key_sees_its_own_rows_only(setup):
    _, client, users = setup
    data = get(client, users["a"], group_by="tenant").json()["data"]
    assert [(d["tenant"], d["requests"]) for d in data] == [("a", 3)]
    assert get(client, users["a"], tenant="a").status_code == 200
    r = get(client, users["a"], tenant="b")
    assert r.status_code == 403 and r.json()["error"]["param"] == "tenant"
    assert [d["tenant"] for d in get(client, users["b"], group_by="tenant").json()["data"]] == ["b"]
    assert client.get("/v1/usage").status_code == 401


@pytest.mark.parametrize(
    ("params", "param"),
    [({"group_by": "tenant,colour"}, "group_by"), ({"granularity": "week"}, "granularity"),
     ({"start": "yesterday"}, "start"), ({"end": "2027-13-01"}, "end"), ({"start": str(T0 + 9 * 86400)}, "start")],
)  # fmt: skip
def test_bad_parameters_are_400s_naming_them(setup, params, param):
    _, client, _ = setup
    r = get(client, ADMIN, **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
