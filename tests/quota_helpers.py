"""What the quota tests share: fake time, usage rows, and the local Redis for the tests that need
one (skipped, with the reason, where it does not answer, except under CI=true, where it must).
Each test gets its own key prefix and removes its keys."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pytest

from ladle.metering.usage import UsageRecord

REDIS_URL = os.environ.get("LADLE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as e:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI=true and Redis at {REDIS_URL} does not answer: {e}") from None
        pytest.skip(f"no Redis at {REDIS_URL} ({e}); set LADLE_TEST_REDIS or start redis-server")
    return client


def unique_prefix() -> str:
    return f"ladle-test:{uuid.uuid4().hex[:12]}:"


def delete_prefix(client, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def utc(*parts) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, now_s: float):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def row(request_id: str, tenant: str, prompt: int, completion: int, cost: float = 0.0) -> UsageRecord:
    return UsageRecord(
        time_s=0.0, request_id=request_id, tenant=tenant, key_id=None, api="/v1/chat/completions",
        model_requested="m", model="m", prompt_tokens=prompt, cached_tokens=0, completion_tokens=completion,
        queue_s=None, ttft_s=None, duration_s=0.1, engine_s=0.0, finish_reason="stop", status=200,
        outcome="served", cost=cost,
    )  # fmt: skip
