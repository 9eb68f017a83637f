"""Quotas: UTC calendar windows, reserve and settle, on both counter backends; time is injected."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from ladle.metering.quotas import Limiter, MemoryCounters, QuotaExceeded, RedisCounters, plan, window
from ladle.metering.tenants import Quota, Tenant
from quota_helpers import REDIS_URL, Clock, delete_prefix, redis_or_skip, row, unique_prefix, utc

# -- windows ----------------------------------------------------------------------------------------


def test_windows_are_utc_calendar_windows():
    now = utc(2026, 12, 31, 23, 59, 37)
    m, d, mo = window("minute", now), window("day", now), window("month", now)
    assert (m.id, m.start_s, m.end_s) == ("m202612312359", utc(2026, 12, 31, 23, 59), utc(2027, 1, 1))
    assert (d.id, d.start_s, d.end_s) == ("d20261231", utc(2026, 12, 31), utc(2027, 1, 1))
    assert (mo.id, mo.start_s, mo.end_s) == ("M202612", utc(2026, 12, 1), utc(2027, 1, 1))
    feb = window("month", utc(2028, 2, 10))  # a leap year
    assert feb.end_s == utc(2028, 3, 1)


def test_plan_has_one_check_per_limit_set():
    tenant = Tenant("a", quota=Quota(requests_per_minute=5, token_budget=100, budget_period="day"))
    checks = plan("p:", tenant, 7, utc(2026, 12, 3, 13, 41, 37))
    assert [(c.limit_name, c.key, c.amount) for c in checks] == [
        ("requests_per_minute", "p:{a}:requests:m202612031341", 1),
        ("token_budget", "p:{a}:tokens:d20261203", 7),
    ]


# -- both backends ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request):
    """A function (clock) -> Limiter on fresh counters of the backend."""
    if request.param == "memory":
        yield lambda clock: Limiter(MemoryCounters(), "t:", clock)
        return
    client = redis_or_skip()
    prefix = unique_prefix()
    made = []

    def make(clock):
        made.append(Limiter(RedisCounters(REDIS_URL), prefix, clock))
        return made[-1]

    yield make
    delete_prefix(client, prefix)
    for limiter in made:
        limiter.close()


def test_over_the_tpm_limit_is_refused_with_when_it_resets(make_limiter):
    clock = Clock(utc(2026, 12, 3, 13, 41, 37))
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(tokens_per_minute=1000))
    limiter.reserve(a, "r1", 990)
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(a, "r2", 50)
    err = e.value
    assert (err.limit_name, err.limit, err.retry_after_s) == ("tokens_per_minute", 1000, 23)
    assert err.resets_at == datetime(2026, 12, 3, 13, 42, tzinfo=timezone.utc)
    assert str(err) == (
        "tenant `a` is over its tokens_per_minute limit of 1000 (used 990, this request needs 50); "
        "it resets at 13:42:00 UTC, in 23 s"
    )
    limiter.reserve(a, "r3", 10)  # what still fits is admitted
    clock.now_s = utc(2026, 12, 3, 13, 42, 0)  # the next minute starts empty
    limiter.reserve(a, "r4", 1000)


def test_a_refused_request_counts_nothing(make_limiter):
    clock = Clock(utc(2026, 12, 3, 13, 41, 0))
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(requests_per_minute=100, tokens_per_minute=100))
    limiter.reserve(a, "r1", 60)
    for i in range(5):
        with pytest.raises(QuotaExceeded):
            limiter.reserve(a, f"x{i}", 50)  # over the TPM: neither its request nor its tokens count
    limiter.reserve(a, "r2", 40)


def test_requests_per_minute(make_limiter):
    clock = Clock(utc(2026, 12, 3, 13, 41, 59) + 0.5)
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(requests_per_minute=2))
    limiter.reserve(a, "r1", 0)
    limiter.reserve(a, "r2", 0)
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(a, "r3", 0)
    assert e.value.limit_name == "requests_per_minute"
    assert e.value.retry_after_s == 1  # never 0
    assert "requests_per_minute limit of 2 (used 2 requests this minute)" in str(e.value)


def test_settling_replaces_the_estimate_by_what_was_used(make_limiter):
    clock = Clock(utc(2026, 12, 3, 13, 41, 0))
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(tokens_per_minute=1000, token_budget=5000, budget_period="day"))
    limiter.reserve(a, "r1", 900)  # prompt + max_tokens
    with pytest.raises(QuotaExceeded):
        limiter.reserve(a, "r2", 200)
    limiter.record(row("r1", "a", 100, 20))  # it used 120
    limiter.reserve(a, "r2", 880)  # 120 + 880 = 1000
    with pytest.raises(QuotaExceeded):
        limiter.reserve(a, "r3", 1)
    limiter.record(row("r1", "a", 100, 20))  # settled once: a second row changes nothing
    limiter.record(row("unknown", "a", 500, 500))  # no reservation (refused before): nothing
    with pytest.raises(QuotaExceeded):
        limiter.reserve(a, "r3", 1)
    for i, minute in enumerate((45, 46, 47)):  # the day kept the settled amounts: 1000 of 5000
        clock.now_s = utc(2026, 12, 3, 13, minute, 0)
        limiter.reserve(a, f"r{4 + i}", 1000)
    limiter.record(row("r6", "a", 0, 0))  # refused by the router after the reservation: 0 tokens
    limiter.record(row("r2", "a", 0, 0))  # r2's 880 given back to the day (its minute is over)
    clock.now_s = utc(2026, 12, 3, 13, 48, 0)
    limiter.reserve(a, "r7", 1000)
    clock.now_s = utc(2026, 12, 3, 13, 49, 0)
    limiter.reserve(a, "r8", 880)  # the day: 120 + 3 x 1000 - 1000 - 880 + 1000 + 880 = 4000
    clock.now_s = utc(2026, 12, 3, 13, 50, 0)
    limiter.reserve(a, "r9", 1000)
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(a, "r10", 1)
    assert e.value.limit_name == "token_budget"
    assert e.value.resets_at == datetime(2026, 12, 4, tzinfo=timezone.utc)
    assert "token_budget limit of 5000 per day (used 5000, this request needs 1)" in str(e.value)
    assert "it resets at 2026-12-04 00:00 UTC, in 10 h 10 min" in str(e.value)


def test_a_month_budget_runs_to_the_end_of_the_month(make_limiter):
    clock = Clock(utc(2026, 2, 27, 12, 0, 0))
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(token_budget=100, budget_period="month"))
    limiter.reserve(a, "r1", 100)
    clock.now_s = utc(2026, 2, 28, 23, 59, 59)
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(a, "r2", 1)
    assert e.value.resets_at == datetime(2026, 3, 1, tzinfo=timezone.utc)
    assert e.value.retry_after_s == 1
    clock.now_s = utc(2026, 3, 1, 0, 0, 0)
    limiter.reserve(a, "r3", 100)


def test_cost_budget_admits_while_spent_is_below_it(make_limiter):
    clock = Clock(utc(2026, 12, 3, 13, 41, 0))
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(cost_budget=1.0, budget_period="month"))
    limiter.reserve(a, "r1", 10_000)
    limiter.reserve(a, "r2", 10_000)  # costs are known at the end only: both admitted
    limiter.record(row("r1", "a", 10, 10, cost=0.75))
    limiter.reserve(a, "r3", 10)
    limiter.record(row("r2", "a", 10, 10, cost=0.25))
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(a, "r4", 10)
    assert e.value.limit_name == "cost_budget"
    assert e.value.resets_at == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert "cost_budget of 1 per month (spent 1)" in str(e.value)


def test_the_limit_that_resets_last_is_named(make_limiter):
    clock = Clock(utc(2026, 12, 3, 13, 41, 0))
    limiter = make_limiter(clock)
    a = Tenant("a", quota=Quota(tokens_per_minute=100, token_budget=100, budget_period="day"))
    limiter.reserve(a, "r1", 100)
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(a, "r2", 1)  # over both: retrying in a minute would not help
    assert e.value.limit_name == "token_budget"


def test_tenants_count_apart(make_limiter):
    limiter = make_limiter(Clock(utc(2026, 12, 3, 13, 41, 0)))
    a, b = (Tenant(t, quota=Quota(requests_per_minute=1)) for t in ("a", "b"))
    limiter.reserve(a, "r1", 0)
    limiter.reserve(b, "r2", 0)
    with pytest.raises(QuotaExceeded):
        limiter.reserve(a, "r3", 0)


def test_a_request_over_the_limit_on_its_own_says_so():
    limiter = Limiter(MemoryCounters(), "t:", Clock(utc(2026, 12, 3, 13, 41, 0)))
    with pytest.raises(QuotaExceeded) as e:
        limiter.reserve(Tenant("a", quota=Quota(tokens_per_minute=100)), "r1", 5000)
    assert "this request alone is over it" in str(e.value)


def test_unlimited_tenants_never_reach_the_counters():
    class Unreachable:
        def reserve(self, checks, now_s):
            raise AssertionError("an unlimited tenant reached the counters")

        add = reserve

    limiter = Limiter(Unreachable())
    reservation = limiter.reserve(Tenant("default"), "r1", 10**9)
    assert reservation.checks == ()
    limiter.record(row("r1", "default", 5, 5))


def test_duplicate_request_ids_settle_each_reservation_once():
    limiter = Limiter(MemoryCounters(), "t:", Clock(utc(2026, 12, 3, 13, 41, 0)))
    a = Tenant("a", quota=Quota(tokens_per_minute=1000))
    limiter.reserve(a, "same", 500)  # a client may send the same X-Request-Id twice
    limiter.reserve(a, "same", 500)
    limiter.record(row("same", "a", 10, 0))
    limiter.record(row("same", "a", 10, 0))
    limiter.reserve(a, "r2", 980)


def test_unreachable_redis_fails_open_and_logs(caplog):
    clock = Clock(utc(2026, 12, 3, 13, 41, 0))
    limiter = Limiter(RedisCounters("redis://127.0.0.1:1/0", socket_timeout_s=0.2), "t:", clock)
    a = Tenant("a", quota=Quota(requests_per_minute=1))
    with caplog.at_level(logging.WARNING, logger="ladle.metering.quotas"):
        for i in range(3):
            limiter.reserve(a, f"r{i}", 0)  # admitted: not counted
            limiter.record(row(f"r{i}", "a", 1, 1))
    warnings = [r for r in caplog.records if "admitting requests uncounted" in r.getMessage()]
    assert len(warnings) == 1


def test_reservations_never_settled_are_forgotten(monkeypatch):
    import ladle.metering.quotas as quotas

    monkeypatch.setattr(quotas, "MAX_RESERVATIONS", 3)
    clock = Clock(utc(2026, 12, 3, 13, 41, 0))
    limiter = Limiter(MemoryCounters(), "t:", clock)
    a = Tenant("a", quota=Quota(token_budget=10**6, budget_period="day"))
    for i in range(5):
        limiter.reserve(a, f"r{i}", 1)
    assert list(limiter._reservations) == ["r2", "r3", "r4"]  # bounded by count
    clock.now_s += quotas.RESERVATION_TTL_S
    limiter.reserve(a, "late", 1)
    assert list(limiter._reservations) == ["late"]  # and by age
