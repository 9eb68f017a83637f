"""Two OS processes hammering one tenant's limit in a shared Redis admit it once, not twice."""

from __future__ import annotations

import multiprocessing
import time

from ladle.metering.quotas import Limiter, QuotaExceeded, RedisCounters
from ladle.metering.tenants import Quota, Tenant
from quota_helpers import REDIS_URL, delete_prefix, redis_or_skip, unique_prefix

NUM_PROCESSES = 2
ATTEMPTS_PER_PROCESS = 400
TOKENS_PER_MINUTE = 3000  # each attempt asks 7 tokens: the processes together ask 5600


def _hammer(prefix: str, now_s: float, start, results) -> None:
    limiter = Limiter(RedisCounters(REDIS_URL), prefix, clock=lambda: now_s)  # one minute for both
    tenant = Tenant("shared", quota=Quota(tokens_per_minute=TOKENS_PER_MINUTE, requests_per_minute=10_000))
    start.wait()
    admitted = 0
    for i in range(ATTEMPTS_PER_PROCESS):
        try:
            limiter.reserve(tenant, f"{multiprocessing.current_process().pid}-{i}", 7)
            admitted += 1
        except QuotaExceeded:
            pass
    results.put(admitted)
    limiter.close()


def test_two_processes_sharing_redis_enforce_one_limit():
    client = redis_or_skip()
    prefix = unique_prefix()
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(prefix, time.time(), start, results)) for _ in range(NUM_PROCESSES)]
    try:
        for p in procs:
            p.start()
        start.set()
        admitted = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        delete_prefix(client, prefix)
    assert min(admitted) > 0, admitted  # both processes really competed
    assert sum(admitted) == TOKENS_PER_MINUTE // 7, admitted  # the script checks and adds atomically: exact
