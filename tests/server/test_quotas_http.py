"""Quotas over HTTP, in process (the tenant and its key put in the server's directory): a tenant at
its TPM limit gets 429 with Retry-After and a message naming the limit, in OpenAI's format on
/v1/completions and /v1/chat/completions and in Anthropic's on /v1/messages; the refusals are counted
by tenant and limit."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from ladle.config import CacheConfig, EngineConfig, LadleConfig, ModelConfig, ModelEntry, ServerConfig
from ladle.metering.quotas import Limiter, MemoryCounters, plan
from ladle.metering.tenants import Quota, Tenant, new_key
from ladle.server.app import build_app
from ladle.server.serve import create_state, make_lifespan

PROMPT = [5, 6, 7, 8, 9]  # 5 tokens + max_tokens 5: each request reserves 10
TPM = 15


@pytest.fixture(scope="module")
def server(tiny_models):
    engine = EngineConfig(model=ModelConfig(model=str(tiny_models["llama"].gguf_path)),
                          cache=CacheConfig(kv_cache_memory_gib=0.02))  # fmt: skip
    cfg = LadleConfig(models=(ModelEntry("tiny", engine=engine),), server=ServerConfig(warmup=False))
    state = create_state(cfg)
    now_s = time.time()
    state.limiter = Limiter(MemoryCounters(), clock=lambda: now_s)  # one minute throughout: no boundary to cross
    state.sinks = [s for s in state.sinks if not isinstance(s, Limiter)] + [state.limiter]
    keys = {}
    for tenant in ("a", "b", "c"):
        state.directory.put(Tenant(tenant, quota=Quota(tokens_per_minute=TPM)))
        record, keys[tenant] = new_key(tenant)
        state.directory.add_key(record)
    with TestClient(build_app(state, lifespan=make_lifespan(state, []))) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the tiny model never turned ready"
            time.sleep(0.05)
        yield client, keys, state


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenant_at_its_tpm_limit_gets_429_with_retry_after(server):
    client, keys, state = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5}
    first = client.post("/v1/completions", json=body, headers=_auth(keys["a"]))
    assert first.status_code == 200, first.text
    refused = client.post("/v1/completions", json=body, headers=_auth(keys["a"]))
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith(
        "tenant `a` is over its tokens_per_minute limit of 15 (used 10, this request needs 10); it resets at "
    )
    assert (
        state.metrics.registry.get_sample_value(
            "ladle_quota_rejections_total", {"tenant": "a", "limit": "tokens_per_minute"}
        )
        == 1
    )
    # another tenant's counters are its own
    assert client.post("/v1/completions", json=body, headers=_auth(keys["b"])).status_code == 200


def test_each_request_settles_its_reservation_to_what_it_used(server):
    """The server's own usage row replaces the estimate (prompt + max_tokens) by the tokens the
    client's usage says; one that ends early gives the rest back."""
    client, keys, state = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5}
    counters, now_s = state.limiter.counters, state.limiter.clock()
    (check,) = plan(state.limiter.prefix, state.directory.get("c"), 0, now_s)
    first = client.post("/v1/completions", json=body, headers=_auth(keys["c"]))
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    assert counters._get(check.key, now_s) == used  # settled: no longer the estimate of 10
    assert client.post("/v1/completions", json=body, headers=_auth(keys["c"])).status_code == 429  # 10 + 10 > 15
    assert counters._get(check.key, now_s) == used  # the refusal reserved nothing
    # a request that stops at once (its EOS forced) keeps 6 of the 10 it reserved: 6 + 10 > 15 still,
    # but with the rest given back tenant d (TPM 17) fits a second request, which the estimate would refuse
    state.directory.put(Tenant("d", quota=Quota(tokens_per_minute=17)))
    record, key_d = new_key("d")
    state.directory.add_key(record)
    stop = state.registry.resolve("tiny").tokenizer.stop_token_ids[0]
    short = {**body, "logit_bias": {str(stop): 100}}
    r = client.post("/v1/completions", json=short, headers=_auth(key_d))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 6
    assert client.post("/v1/completions", json=body, headers=_auth(key_d)).status_code == 200


def test_chat_and_anthropic_messages_are_refused_in_their_formats(server):
    client, keys, _ = server  # tenant a is at its limit since the first test
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    r = client.post("/v1/chat/completions", json=chat, headers=_auth(keys["a"]))
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    r = client.post("/v1/messages", json=chat, headers={"x-api-key": keys["a"]})
    assert r.status_code == 429 and "Retry-After" in r.headers
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "tokens_per_minute limit of 15" in body["error"]["message"]
