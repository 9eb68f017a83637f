"""Two `ladle serve` processes sharing the local Redis (and one tenant database) enforce a tenant's
limit once: the requests both admit together stay within 5% of it (the Lua script makes it exact);
every refusal is a 429 with Retry-After naming the limit."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from helpers import ServerProcess
from quota_helpers import REDIS_URL, redis_or_skip

ADMIN_KEY = "admin-key-for-quota-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [5, 6, 7, 8, 9]  # 5 prompt tokens + max_tokens 1: each request reserves 6
TOKENS_PER_MINUTE = 120  # 20 requests
NUM_ATTEMPTS = 60  # 30 per server


def _start(tiny_models, data_dir) -> ServerProcess:
    return ServerProcess("--model", str(tiny_models["llama"].gguf_path), "--served-model-name", "tiny",
                         "--kv-cache-memory", "0.02", "--no-embedding-model", "--no-warmup",
                         "--admin-key", ADMIN_KEY, "--data-dir", str(data_dir), "--redis", REDIS_URL)  # fmt: skip


def _wait_for_a_fresh_minute() -> None:
    """The window is the wall clock's minute: start early in one, so that the burst ends in it."""
    second = datetime.now(timezone.utc).second
    if second > 30:
        time.sleep(60 - second + 1)


def test_two_servers_sharing_redis_enforce_one_limit(tiny_models, tmp_path):
    client = redis_or_skip()
    tenant = "q" + uuid.uuid4().hex[:10]  # its own counters: no other run shares them
    first = _start(tiny_models, tmp_path)
    second = None
    try:
        quota = {"tokens_per_minute": TOKENS_PER_MINUTE}
        status, _, body = first.request("POST", "/admin/tenants", {"id": tenant, "quota": quota}, ADMIN)
        assert status == 201, body
        status, _, created = first.request("POST", f"/admin/tenants/{tenant}/keys", {"name": "t"}, ADMIN)
        assert status == 201, created
        second = _start(tiny_models, tmp_path)  # the same database: it loads the tenant and its key
        headers = {"Authorization": f"Bearer {created['key']}"}
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1}
        servers = [first, second]

        def attempt(i: int):
            status, resp_headers, resp = servers[i % 2].request("POST", "/v1/completions", body, headers)
            return i % 2, status, resp_headers, resp

        _wait_for_a_fresh_minute()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(NUM_ATTEMPTS)))
        counted = sum(srv.metric("ladle_quota_rejections_total", tenant=tenant) for srv in servers)
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        keys = list(client.scan_iter(match=f"ladle:quota:{{{tenant}}}:*"))
        if keys:
            client.delete(*keys)
    admitted = [s for s, status, _, _ in results if status == 200]
    refused = [(h, r) for _, status, h, r in results if status == 429]
    assert len(admitted) + len(refused) == NUM_ATTEMPTS, [r for r in results if r[1] not in (200, 429)]
    limit = TOKENS_PER_MINUTE // 6
    assert limit <= len(admitted) <= limit * 1.05, len(admitted)
    assert set(admitted) == {0, 1}  # both servers admitted some: they shared one counter
    assert counted == len(refused)  # /metrics counts each refusal by tenant and limit
    for h, r in refused:
        assert 1 <= int({k.lower(): v for k, v in h.items()}["retry-after"]) <= 60
        assert f"tenant `{tenant}` is over its tokens_per_minute limit of {TOKENS_PER_MINUTE}" in r["error"]["message"]
