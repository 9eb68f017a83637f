"""The store on SQLite and on PostgreSQL: tenants and keys round-trip, migrations are idempotent,
usage reports group and bucket the same on both."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from ladle.metering.store import Conflict, NotFound, Store
from ladle.metering.tenants import Quota, Tenant, new_key
from ladle.metering.usage import UsageRecord

HOUR = 3600.0
T0 = 1_800_000_000.0 - (1_800_000_000.0 % 86400)  # a UTC midnight


def row(time_s, tenant="a", model="m1", prompt=10, completion=5, cached=0, engine_s=0.5, cost=0.25, **extra):
    fields = dict(time_s=time_s, request_id=f"r{time_s}", tenant=tenant, key_id=None, api="/v1/chat/completions",
                  model_requested=model, model=model, prompt_tokens=prompt, cached_tokens=cached,
                  completion_tokens=completion, queue_s=0.01, ttft_s=0.1, duration_s=1.0, engine_s=engine_s,
                  finish_reason="stop", status=200, outcome="served", cost=cost)  # fmt: skip
    return UsageRecord(**{**fields, **extra})


@pytest.fixture
def store(metering_config):
    s = Store.open(metering_config)
    yield s
    s.close()


def test_tenants_and_keys_round_trip(store):
    tenant = Tenant("team-a", models=("m1", "m2"), priority_class="batch", weight=2.5,
                    quota=Quota(requests_per_minute=60, cost_budget=9.5, budget_period="day"))  # fmt: skip
    store.create_tenant(tenant)
    assert store.tenants() == [tenant]
    with pytest.raises(Conflict, match="team-a"):
        store.create_tenant(Tenant("team-a"))
    changed = dataclasses.replace(tenant, weight=1.0, quota=Quota(tokens_per_minute=1000))
    store.update_tenant(changed)
    assert store.tenant("team-a") == changed
    record, key = new_key("team-a", "ci")
    store.create_key(record)
    with pytest.raises(NotFound, match="nobody"):
        store.create_key(new_key("nobody")[0])
    assert store.keys("team-a") == [record] and store.keys("other") == []
    directory = store.load_directory()
    assert directory.authenticate(key).tenant == changed
    revoked = store.revoke_key(record.id)
    assert revoked.revoked_s is not None and store.keys()[0].revoked_s == revoked.revoked_s
    assert store.load_directory().authenticate(key) is None
    store.delete_tenant("team-a")
    assert store.tenants() == [] and store.keys() == []
    with pytest.raises(NotFound):
        store.delete_tenant("team-a")


def test_migrations_run_twice_change_nothing(metering_config):
    first = Store.open(metering_config)
    first.create_tenant(Tenant("kept"))
    first.close()
    second = Store.open(metering_config)  # upgrade head again: a no-op, the data stays
    assert [t.id for t in second.tenants()] == ["kept"]
    with second.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    assert {"tenants", "api_keys", "usage", "alembic_version"} <= tables and version == "0001"
    second.close()


def test_report_sums_and_buckets_by_hour_and_day(store):
    store.insert_usage([
        row(T0 + 10, prompt=10, completion=5, cached=4),
        row(T0 + HOUR - 1, prompt=20, completion=1),
        row(T0 + HOUR, tenant="b", model="m2", prompt=7, completion=3, cost=1.0),
        row(T0 + 86400 + 5, prompt=1, completion=1, engine_s=2.0),
    ])  # fmt: skip
    hourly = store.usage_report(("tenant",), granularity="hour")
    assert [(r["bucket"], r["tenant"], r["requests"], r["total_tokens"]) for r in hourly] == [
        (T0, "a", 2, 36), (T0 + HOUR, "b", 1, 10), (T0 + 86400, "a", 1, 2),
    ]  # fmt: skip
    daily = store.usage_report(("tenant", "model"), granularity="day")
    assert [(r["bucket"], r["tenant"], r["model"], r["requests"]) for r in daily] == [
        (T0, "a", "m1", 2), (T0, "b", "m2", 1), (T0 + 86400, "a", "m1", 1),
    ]  # fmt: skip
    total = store.usage_report()
    assert total == [{"bucket": None, "requests": 4, "prompt_tokens": 38, "cached_tokens": 4,
                      "completion_tokens": 10, "total_tokens": 48, "engine_s": 3.5, "cost": 1.75}]  # fmt: skip
    only_a = store.usage_report(("model",), start_s=T0 + 60, end_s=T0 + 86400, tenant="a")
    assert [(r["model"], r["requests"], r["prompt_tokens"]) for r in only_a] == [("m1", 1, 20)]
    assert store.usage_report(("tenant",), start_s=T0 + 10 * 86400) == []


def test_report_refuses_unknown_groups_and_granularities(store):
    with pytest.raises(Exception, match="group_by: unknown column 'key_hash'"):
        store.usage_report(("key_hash",))
    with pytest.raises(Exception, match="granularity must be one of hour, day"):
        store.usage_report(granularity="week")


def test_every_usage_field_round_trips(store):
    record = row(T0, key_id="key_0123456789ab", model_requested="auto", model="m1", queue_s=None, ttft_s=None,
                 finish_reason=None, status=499, outcome="aborted")  # fmt: skip
    store.insert_usage([record])
    with store.engine.connect() as conn:
        got = conn.execute(sa.text("SELECT * FROM usage")).mappings().one()
    assert {k: got[k] for k in dataclasses.asdict(record)} == dataclasses.asdict(record)
