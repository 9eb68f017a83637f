"""The upstream fallback, against a second Ladle process on loopback as the upstream: used when
the local model's queue is full and when the local model failed to load; streaming and not, the
upstream's answer and usage passed through and counted."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import (
    ServerProcess,
    long_context_copy,
    open_stream,
    read_events,
    send_request,
    usage_rows,
    wait_for_metric,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fallback")
    flags = ["--served-model-name", "remote", "--api-key", "upstream-key", "--dtype", "float32"]
    upstream = ServerProcess("--model", str(tiny_models["qwen2"].hf_dir), *flags, "--kv-cache-memory", "0.02")
    broken = tmp / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    local = long_context_copy(tiny_models["llama"].hf_dir, tmp / "local", 16384)
    config = {  # a queue-wait bound beyond the endless stream's predicted wait: the queue bound decides
        "admission": {"max_queue_wait_s": 10**7},
        "upstreams": [{"name": "peer", "url": f"{upstream.url}/v1", "model": "remote", "api_key": "upstream-key"}],
        "models": [
            {"name": "local", "model": str(local), "dtype": "float32", "kv_cache_memory_gib": 0.05, "max_num_seqs": 1,
             "max_waiting_requests": 1, "fallback": "peer"},
            {"name": "broken", "model": str(broken), "fallback": "peer"},
        ],
    }  # fmt: skip
    (tmp / "ladle.yaml").write_text(yaml.safe_dump(config))
    server = ServerProcess("--config", str(tmp / "ladle.yaml"), "--usage-log", str(tmp / "usage.jsonl"))
    server.usage_log = tmp / "usage.jsonl"
    yield server, upstream
    server.stop()
    upstream.stop()


def test_a_failed_local_model_falls_back_to_the_upstream(servers):
    server, upstream = servers
    body = {"model": "broken", "prompt": "hello", "max_tokens": 5, "ignore_eos": True}
    status, headers, resp = server.request("POST", "/v1/completions", body)
    assert status == 200 and resp["model"] == "remote"  # the upstream's answer, unchanged
    assert resp["usage"]["completion_tokens"] == 5 and resp["usage"]["prompt_tokens"] > 0
    assert headers["x-ladle-routed-to"] == "peer"
    assert headers["x-ladle-route-reason"].startswith("fell back to upstream peer: the model `broken` failed to load")
    assert server.metric("ladle_generation_tokens_total", model_name="peer") == 5
    assert server.metric("ladle_router_requests_total", model_name="peer", outcome="fell_back") == 1


def test_a_full_local_queue_falls_back_streaming_and_not(servers):
    server, upstream = servers
    hold = open_stream(server, "/v1/completions", {"model": "local", "prompt": "x", "max_tokens": 16000,
                                                   "ignore_eos": True})  # fmt: skip
    read_events(hold[1], 2)
    waiting = send_request(
        server, "/v1/completions", {"model": "local", "prompt": "y", "max_tokens": 2, "stream": True}
    )
    try:
        wait_for_metric(server, "ladle_num_requests_waiting", 1, model_name="local")
        chat = {"model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True}
        status, headers, resp = server.request("POST", "/v1/chat/completions", chat)
        assert status == 200 and resp["model"] == "remote" and resp["usage"]["completion_tokens"] == 4
        assert headers["x-ladle-route-reason"] == (
            "fell back to upstream peer: 1 requests are already waiting (limit 1)"
        )
        conn, stream = open_stream(server, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
        events = [json.loads(e) for e in read_events(stream, 100) if e != "[DONE]"]
        conn.close()
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in events if c["choices"])
        assert all(e["model"] == "remote" for e in events) and text
        assert events[-1]["usage"]["completion_tokens"] == 4  # the client asked for usage: it gets the upstream's
        conn, stream = open_stream(server, "/v1/completions", {"model": "local", "prompt": "z", "max_tokens": 3,
                                                               "ignore_eos": True})  # fmt: skip
        raw = read_events(stream, 100)
        conn.close()
        assert raw[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in raw[:-1])  # unchanged: no usage
        assert server.metric("ladle_generation_tokens_total", model_name="peer") == 5 + 4 + 4 + 3
    finally:
        hold[0].close()
        waiting.close()


def test_a_fallen_back_request_is_one_row_with_the_upstreams_usage(servers):
    server, _ = servers
    body = {"model": "broken", "prompt": "hello", "max_tokens": 3, "ignore_eos": True}
    status, _, plain = server.request("POST", "/v1/completions", body, {"X-Request-Id": "fb-plain"})
    assert status == 200
    conn, stream = open_stream(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}},
                               {"X-Request-Id": "fb-stream"})  # fmt: skip
    events = [json.loads(e) for e in read_events(stream, 100) if e != "[DONE]"]
    conn.close()
    sent = {"fb-plain": plain["usage"], "fb-stream": events[-1]["usage"]}
    rows = usage_rows(server.usage_log, set(sent))
    for rid, usage in sent.items():
        row = rows[rid]
        assert (row.model_requested, row.model, row.outcome, row.status) == ("broken", "peer", "fell_back", 200)
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert row.completion_tokens == 3
