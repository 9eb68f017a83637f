"""Quotas: a tenant's requests and tokens per minute, its token and cost budgets per day or month
(docs/tenants.md).

A request reserves at admission: 1 request, and its estimated tokens (prompt + max_tokens, or what
is left of the context), against every limit of its tenant's quota, all or nothing; its usage row
settles the reservation at the end (the estimate replaced by what it used, its cost added). The
counters are UTC calendar windows: the minute for requests_per_minute and tokens_per_minute, the
day or month (Quota.budget_period) for token_budget and cost_budget. They live in this process
(MemoryCounters) or in Redis (RedisCounters: one Lua script checks and adds atomically, so N
replicas enforce one limit). Both take the same Checks, built here in one place (`plan`).

Where Redis does not answer, the limiter fails open: the request is admitted uncounted and a
warning logged (at most once per FAIL_OPEN_LOG_INTERVAL_S). Quotas share capacity and cost; they
are not what keeps a tenant out (its key is), and an outage of the counters should not become an
outage of inference.
"""

from __future__ import annotations

import calendar
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from ladle.errors import LadleError
from ladle.metering.tenants import Tenant
from ladle.metering.usage import UsageRecord

log = logging.getLogger(__name__)

LIMITS = ("requests_per_minute", "tokens_per_minute", "token_budget", "cost_budget")
KEY_SLACK_S = 60  # counters outlive their window by this much (clocks of replicas may differ a little)
RESERVATION_TTL_S = 6 * 3600  # a reservation never settled (a lost row) is forgotten after this
MAX_RESERVATIONS = 100_000  # ... or once this many wait (the oldest first): memory stays bounded
FAIL_OPEN_LOG_INTERVAL_S = 10.0
REDIS_RETRY_S = 1.0  # after a Redis failure, requests fail open without trying it for this long


# -- windows and checks: one place for both backends ------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One UTC calendar window: a minute, a day or a month."""

    period: str  # "minute", "day" or "month"
    id: str  # e.g. "m202612031342", "d20261203", "M202612": part of the counter keys
    start_s: float  # Unix time it starts
    end_s: float  # ... and ends (the next one's start)


def window(period: str, now_s: float) -> Window:
    t = datetime.fromtimestamp(now_s, timezone.utc)
    if period == "minute":
        start = t.replace(second=0, microsecond=0)
        start_s = start.timestamp()
        return Window(period, start.strftime("m%Y%m%d%H%M"), start_s, start_s + 60)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        start_s = start.timestamp()
        return Window(period, start.strftime("d%Y%m%d"), start_s, start_s + 86400)
    if period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(t.year, t.month)[1]
        return Window(period, start.strftime("M%Y%m"), start.timestamp(), start.timestamp() + days * 86400)
    raise ValueError(f"unknown window period {period!r}")


@dataclass(frozen=True)
class Check:
    """One limit of a quota, in the window it counts in."""

    limit_name: str  # LIMITS
    key: str  # the counter: prefix + {tenant} + counter + window id
    window: Window
    limit: float
    amount: float  # what the request adds to the counter at admission
    is_strict: bool = False  # admitted while used < limit (costs, known only later); else used + amount <= limit

    def fits(self, used: float) -> bool:
        return used < self.limit if self.is_strict else used + self.amount <= self.limit

    def ttl_s(self, now_s: float) -> int:
        return max(1, math.ceil(self.window.end_s - now_s) + KEY_SLACK_S)


def plan(prefix: str, tenant: Tenant, tokens: int, now_s: float) -> list[Check]:
    """The checks of the tenant's quota for a request of `tokens` (estimated) tokens, in LIMITS order."""
    q = tenant.quota
    minute, budget = window("minute", now_s), window(q.budget_period, now_s)

    def key(counter: str, w: Window) -> str:
        return f"{prefix}{{{tenant.id}}}:{counter}:{w.id}"  # {tenant}: one Redis Cluster slot per tenant

    checks = []
    if q.requests_per_minute is not None:
        checks.append(Check("requests_per_minute", key("requests", minute), minute, q.requests_per_minute, 1))
    if q.tokens_per_minute is not None:
        checks.append(Check("tokens_per_minute", key("tokens", minute), minute, q.tokens_per_minute, tokens))
    if q.token_budget is not None:
        checks.append(Check("token_budget", key("tokens", budget), budget, q.token_budget, tokens))
    if q.cost_budget is not None:
        checks.append(Check("cost_budget", key("cost", budget), budget, q.cost_budget, 0.0, is_strict=True))
    return checks


class QuotaExceeded(LadleError):
    """A request over one of its tenant's limits (the one that resets last, where several are)."""

    def __init__(self, tenant: str, check: Check, used: float, now_s: float):
        self.tenant = tenant
        self.limit_name = check.limit_name
        self.limit = check.limit
        self.used = used
        self.resets_at = datetime.fromtimestamp(check.window.end_s, timezone.utc)
        self.retry_after_s = max(1, math.ceil(check.window.end_s - now_s))
        super().__init__(_message(tenant, check, used, self.retry_after_s))


def _message(tenant: str, check: Check, used: float, retry_after_s: int) -> str:
    name, limit = check.limit_name, _number(check.limit)
    if check.limit_name == "requests_per_minute":
        what = f"{name} limit of {limit} (used {_number(used)} requests this minute)"
    elif check.is_strict:
        what = f"{name} of {limit} per {check.window.period} (spent {_number(used)})"
    else:
        per = "" if check.window.period == "minute" else f" per {check.window.period}"
        what = f"{name} limit of {limit}{per} (used {_number(used)}, this request needs {_number(check.amount)})"
        if check.amount > check.limit:
            what += " and this request alone is over it: lower its max_tokens or shorten its prompt"
    resets = datetime.fromtimestamp(check.window.end_s, timezone.utc)
    at = resets.strftime("%H:%M:%S" if check.window.period == "minute" else "%Y-%m-%d %H:%M")
    return f"tenant `{tenant}` is over its {what}; it resets at {at} UTC, in {_duration(retry_after_s)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _duration(s: int) -> str:
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# -- the counters -----------------------------------------------------------------------------------------


class Counters(Protocol):
    def reserve(self, checks: list[Check], now_s: float) -> list[float] | None:
        """Atomically: if every check fits, add each one's amount and return None; else change
        nothing and return what each counter holds."""

    def add(self, changes: list[tuple[Check, float]], now_s: float) -> None:
        """Add each amount to its check's counter (a negative one gives back)."""

    def ping(self) -> bool: ...

    def close(self) -> None: ...


class MemoryCounters:
    """The counters in this process (one replica)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, float]] = {}  # key -> (value, expires at, Unix s)
        self._next_sweep_s = 0.0

    def _get(self, key: str, now_s: float) -> float:
        value, expires_s = self._values.get(key, (0.0, 0.0))
        return value if expires_s > now_s else 0.0

    def reserve(self, checks: list[Check], now_s: float) -> list[float] | None:
        with self._lock:
            self._sweep(now_s)
            used = [self._get(c.key, now_s) for c in checks]
            if not all(c.fits(u) for c, u in zip(checks, used, strict=True)):
                return used
            for c, u in zip(checks, used, strict=True):
                self._values[c.key] = (u + c.amount, now_s + c.ttl_s(now_s))
            return None

    def add(self, changes: list[tuple[Check, float]], now_s: float) -> None:
        with self._lock:
            for c, amount in changes:
                self._values[c.key] = (self._get(c.key, now_s) + amount, now_s + c.ttl_s(now_s))

    def _sweep(self, now_s: float) -> None:
        """Drop expired counters, at most once a minute."""
        if now_s < self._next_sweep_s:
            return
        self._next_sweep_s = now_s + 60
        self._values = {k: v for k, v in self._values.items() if v[1] > now_s}

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


# KEYS: the counters; ARGV: per key limit, amount, is_strict (0/1), ttl_s. Returns {} when every
# check fits (the amounts are then added), else what each counter holds (as strings: Lua numbers
# become integers on the way back).
RESERVE_SCRIPT = """
local used = {}
local fits = true
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 4
  local limit, amount = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local u = tonumber(redis.call('GET', key) or '0')
  used[i] = string.format('%.17g', u)
  if ARGV[base + 3] == '1' then
    if u >= limit then fits = false end
  elseif u + amount > limit then
    fits = false
  end
end
if not fits then return used end
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 4
  redis.call('INCRBYFLOAT', key, ARGV[base + 2])
  redis.call('EXPIRE', key, ARGV[base + 4])
end
return {}
"""


class RedisCounters:
    """The counters in Redis, shared by every replica that uses the same URL (and prefix)."""

    def __init__(self, url: str, socket_timeout_s: float = 0.5):
        import redis

        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._reserve = self.client.register_script(RESERVE_SCRIPT)

    def reserve(self, checks: list[Check], now_s: float) -> list[float] | None:
        args = [x for c in checks for x in (_float(c.limit), _float(c.amount), int(c.is_strict), c.ttl_s(now_s))]
        used = self._reserve(keys=[c.key for c in checks], args=args)
        return [float(u) for u in used] if used else None

    def add(self, changes: list[tuple[Check, float]], now_s: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for c, amount in changes:
            pipe.incrbyfloat(c.key, amount)
            pipe.expire(c.key, c.ttl_s(now_s))
        pipe.execute()

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        self.client.close()


def _float(value: float) -> str:
    return repr(float(value))


# -- the limiter ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    """What a request reserved, to settle when its usage row comes."""

    tenant: str
    tokens: int  # the estimate counted at admission
    checks: tuple[Check, ...] = ()  # the limits it was counted against (none: unlimited, or not counted)
    time_s: float = 0.0  # when it was made


@dataclass
class Limiter:
    """Checks and reserves at admission (reserve), settles at the end (record: a UsageSink)."""

    counters: Counters = field(default_factory=MemoryCounters)
    prefix: str = "ladle:quota:"  # every counter key starts with it
    clock: Callable[[], float] = time.time
    _reservations: OrderedDict = field(init=False, default_factory=OrderedDict)  # request id -> [Reservation]
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _retry_at_s: float = field(init=False, default=0.0)  # the counters failed: fail open until then
    _logged_s: float = field(init=False, default=-math.inf)

    def reserve(self, tenant: Tenant, request_id: str, tokens: int) -> Reservation:
        """Count the request against every limit of its tenant's quota, or raise QuotaExceeded
        (naming the limit that resets last among those it is over) and count nothing."""
        now_s = self.clock()
        if tenant.quota.is_unlimited:
            return Reservation(tenant.id, tokens, (), now_s)
        checks = plan(self.prefix, tenant, tokens, now_s)
        used = self._counted(lambda: self.counters.reserve(checks, now_s), now_s)
        if used is _FAILED:
            return Reservation(tenant.id, tokens, (), now_s)
        if used is not None:
            counted = list(zip(checks, used, strict=True))
            over = [(c, u) for c, u in counted if not c.fits(u)] or counted  # (or: a float's last digit)
            check, u = max(over, key=lambda cu: cu[0].window.end_s)
            raise QuotaExceeded(tenant.id, check, u, now_s)
        reservation = Reservation(tenant.id, tokens, tuple(checks), now_s)
        self._keep(request_id, reservation)
        return reservation

    def record(self, row: UsageRecord) -> None:
        """Settle the request's reservation: its actual tokens for the estimate, in the windows it
        was counted in (those not yet over), and its cost; a row without one changes nothing."""
        reservation = self._take(row.request_id, row.tenant)
        if reservation is None:
            return
        now_s = self.clock()
        changes = []
        for c in reservation.checks:
            if c.window.end_s <= now_s:
                continue
            if c.limit_name in ("tokens_per_minute", "token_budget") and row.total_tokens != reservation.tokens:
                changes.append((c, row.total_tokens - reservation.tokens))
            elif c.limit_name == "cost_budget" and row.cost:
                changes.append((c, row.cost))
        if changes:
            self._counted(lambda: self.counters.add(changes, now_s), now_s)

    def is_reachable(self) -> bool:
        """Whether the counters answer (checked at start; in-process ones always do)."""
        return self.counters.ping()

    def close(self) -> None:
        self.counters.close()

    def _keep(self, request_id: str, reservation: Reservation) -> None:
        with self._lock:
            self._reservations.setdefault(request_id, []).append(reservation)
            while self._reservations:  # forget the oldest ones never settled
                oldest = next(iter(self._reservations.values()))[0]
                is_old = reservation.time_s - oldest.time_s >= RESERVATION_TTL_S
                if not is_old and len(self._reservations) <= MAX_RESERVATIONS:
                    break
                self._reservations.popitem(last=False)

    def _take(self, request_id: str, tenant: str) -> Reservation | None:
        with self._lock:
            kept = self._reservations.get(request_id)
            if not kept:
                return None
            index = next((i for i, r in enumerate(kept) if r.tenant == tenant), None)
            if index is None:
                return None
            reservation = kept.pop(index)
            if not kept:
                del self._reservations[request_id]
            return reservation

    def _counted(self, call: Callable[[], object], now_s: float):
        """The counters' answer, or _FAILED where they failed (fail open: log, try again later)."""
        if now_s < self._retry_at_s:
            return _FAILED
        try:
            return call()
        except Exception as e:  # redis.RedisError, OSError: the counters are unreachable or broken
            self._retry_at_s = now_s + REDIS_RETRY_S
            if now_s - self._logged_s >= FAIL_OPEN_LOG_INTERVAL_S:
                self._logged_s = now_s
                log.warning("quota counters failed (%s: %s): admitting requests uncounted", type(e).__name__, e)
            return _FAILED


_FAILED = object()


def build_limiter(redis_url: str | None, prefix: str = "ladle:quota:") -> Limiter:
    """The limiter a server uses: counters in Redis where a URL is given, else in this process."""
    if redis_url is None:
        return Limiter(MemoryCounters(), prefix)
    return Limiter(RedisCounters(redis_url), prefix)
