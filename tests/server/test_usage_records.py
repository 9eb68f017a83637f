"""One usage row per HTTP request, read back from a live server's --usage-log and from its
ledger (SQLite and PostgreSQL): the rows' token sums equal the `usage` the clients received,
exactly, across non-streaming and streaming requests (with and without include_usage), n > 1,
the Anthropic API, a degraded request, a failed one (a model that cannot load) and refused ones
(400, 404, and 403 for a model the tenant may not use), each with its status and outcome; a
client that leaves mid-stream is recorded as aborted (499) with at least the tokens it had read."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid

import pytest
import sqlalchemy
import yaml

from helpers import ServerProcess, long_context_copy, open_stream, read_events, usage_rows, wait_for_metric
from ladle.config import MeteringConfig
from ladle.metering.store import create_engine, database_url
from ladle.metering.usage_log import read_usage_log

pytestmark = pytest.mark.slow
FOREVER = {"prompt": "count", "max_tokens": 16000, "ignore_eos": True, "logprobs": 1}
ADMIN_KEY = "admin-key-usage"
COMMON = {"dtype": "float32", "kv_cache_memory_gib": 0.05, "max_num_seqs": 1, "max_waiting_requests": 1}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request):
    """The ledger's database: --data-dir's SQLite file (ServerProcess's temporary folder), or a
    fresh database on the local PostgreSQL (skipped when it does not answer, except under CI)."""
    if request.param == "sqlite":
        yield None
        return
    import psycopg

    admin_url = os.environ.get("LADLE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg.connect(admin_url, autocommit=True, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL at {admin_url} does not answer: {str(e).strip().splitlines()[0]}")
    name = "ladle_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory, database):
    tmp = tmp_path_factory.mktemp("usage")
    big = long_context_copy(tiny_models["qwen2"].hf_dir, tmp / "big", 16384)
    small = long_context_copy(tiny_models["llama"].hf_dir, tmp / "small", 16384)  # endless streams fit both
    broken = tmp / "broken.gguf"
    broken.write_bytes(tiny_models["llama"].gguf_path.read_bytes()[:1000])
    config = {
        "server": {"admin_keys": [ADMIN_KEY]},
        "admission": {"max_queue_wait_s": 10**7},  # the queue bound decides (see test_admission_server)
        "metering": {"prices": [{"model": "small", "prompt_per_1k": 1.0, "completion_per_1k": 2.0}]},
        "models": [
            {"name": "big", "model": str(big), "degrade_to": "small", **COMMON},
            {"name": "small", "model": str(small), **COMMON},
            {"name": "broken", "model": str(broken), "dtype": "float32"},
        ],
    }
    (tmp / "ladle.yaml").write_text(yaml.safe_dump(config))
    log = tmp / "usage.jsonl"
    flags = ("--database", database) if database else ()
    s = ServerProcess("--config", str(tmp / "ladle.yaml"), "--usage-log", str(log), *flags)
    s.usage_log = log
    s.metering = MeteringConfig(database=database) if database else MeteringConfig(data_dir=s.data_dir)
    yield s
    s.stop()


def rows_of(server, request_ids) -> dict:
    return usage_rows(server.usage_log, request_ids)


def post(server, path, body, rid):
    return server.request("POST", path, body, {"X-Request-Id": rid})


def stream(server, path, body, rid) -> list[dict]:
    """A stream read to its end: its JSON events."""
    conn, resp = open_stream(server, path, body, {"X-Request-Id": rid})
    try:
        events = read_events(resp, 10**6)
    finally:
        conn.close()
    return [json.loads(e) for e in events if e != "[DONE]"]


def tokenized(server, model, prompt) -> int:
    status, _, body = server.request("POST", "/tokenize", {"model": model, "prompt": prompt})
    assert status == 200, body
    return body["count"]


def test_rows_add_up_to_the_usage_the_clients_received(server):
    start_s = time.time()
    sent = {}  # request id -> (prompt, cached, completion) as the client's usage said

    def usage(rid, u):
        sent[rid] = (u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"])

    status, _, body = post(server, "/v1/completions", {"model": "small", "prompt": "one two", "max_tokens": 4}, "plain")
    assert status == 200
    usage("plain", body["usage"])
    status, _, body = post(server, "/v1/completions", {"model": "small", "prompt": ["a b", "c d e"], "n": 2,
                                                        "max_tokens": 3, "ignore_eos": True}, "n2")  # fmt: skip
    assert status == 200 and len(body["choices"]) == 4 and body["usage"]["completion_tokens"] == 12
    usage("n2", body["usage"])
    chat = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = stream(server, "/v1/chat/completions", chat, "chat-stream")
    usage("chat-stream", events[-1]["usage"])
    status, _, body = post(server, "/v1/chat/completions", {**chat, "n": 1, "stream_options": None}, "chat")
    assert status == 200
    usage("chat", body["usage"])
    # without include_usage the client knows what it got: max_tokens tokens (finish length) of its prompt
    events = stream(server, "/v1/completions", {"model": "small", "prompt": "five", "max_tokens": 5,
                                                 "ignore_eos": True}, "bare-stream")  # fmt: skip
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]
    sent["bare-stream"] = (tokenized(server, "small", "five"), None, 5)
    anthropic = {"model": "small", "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}
    status, _, body = post(server, "/v1/messages", anthropic, "messages")
    assert status == 200
    u = body["usage"]
    sent["messages"] = (u["input_tokens"] + u["cache_read_input_tokens"], u["cache_read_input_tokens"],
                        u["output_tokens"])  # fmt: skip
    events = stream(server, "/v1/messages", anthropic, "messages-stream")
    start, delta = events[0]["message"]["usage"], [e for e in events if e["type"] == "message_delta"][0]["usage"]
    sent["messages-stream"] = (start["input_tokens"] + start["cache_read_input_tokens"],
                               start["cache_read_input_tokens"], delta["output_tokens"])  # fmt: skip

    rows = rows_of(server, set(sent))
    for rid, (prompt, cached, completion) in sent.items():
        row = rows[rid]
        assert (row.prompt_tokens, row.completion_tokens) == (prompt, completion), rid
        assert cached is None or row.cached_tokens == cached, rid
        assert (row.status, row.outcome, row.model, row.model_requested) == (200, "served", "small", "small"), rid
        assert row.tenant == "default" and row.key_id is None
        assert row.ttft_s is not None and row.queue_s is not None and 0 <= row.ttft_s <= row.duration_s, rid
        assert row.finish_reason in ("stop", "length"), rid
        assert row.cost == pytest.approx(
            (row.prompt_tokens - row.cached_tokens) / 1000 + row.completion_tokens * 2 / 1000
        ), rid
    assert rows["plain"].api == "/v1/completions" and rows["messages"].api == "/v1/messages"
    assert sum(r.prompt_tokens for r in rows.values()) == sum(p for p, _, _ in sent.values())
    assert sum(r.completion_tokens for r in rows.values()) == sum(c for _, _, c in sent.values())
    # the ledger's report over these requests' time says the same (GET /v1/usage flushes the ledger)
    status, _, report = server.request("GET", f"/v1/usage?group_by=model&start={start_s}")
    assert status == 200, report
    [small] = report["data"]
    assert (small["model"], small["requests"]) == ("small", len(sent))
    assert small["prompt_tokens"] == sum(p for p, _, _ in sent.values())
    assert small["completion_tokens"] == sum(c for _, _, c in sent.values())
    assert small["cost"] == pytest.approx(sum(r.cost for r in rows.values()))


def test_aborted_degraded_and_refused_requests_each_leave_one_row(server):
    hold = open_stream(server, "/v1/completions", {**FOREVER, "model": "big"}, {"X-Request-Id": "hold"})
    read = read_events(hold[1], 3)  # big's one slot is taken; the tokens this client read:
    num_read = sum(len(json.loads(e)["choices"][0]["logprobs"]["tokens"]) for e in read)
    queued = {}  # request id -> its response, once the slot it waits for is free

    def wait_in(model, rid):
        def run():
            queued[rid] = post(server, "/v1/completions", {"model": model, "prompt": "wait", "max_tokens": 3}, rid)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    waiter = wait_in("big", "queued")
    wait_for_metric(server, "ladle_num_requests_waiting", 1, model_name="big")  # ... and its queue is full
    status, _, degraded = post(server, "/v1/completions", {"model": "big", "prompt": "hi", "max_tokens": 3}, "degraded")
    assert status == 200 and degraded["model"] == "small"
    hold_small = open_stream(server, "/v1/completions", {**FOREVER, "model": "small"}, {"X-Request-Id": "hold-small"})
    read_events(hold_small[1], 2)  # small's slot too, and its queue:
    waiter_small = wait_in("small", "queued-small")
    wait_for_metric(server, "ladle_num_requests_waiting", 1, model_name="small")
    status, _, refused = post(server, "/v1/completions", {"model": "big", "prompt": "hi", "max_tokens": 3}, "refused")
    assert status == 429 and refused["error"]["code"] == "rate_limit_exceeded"
    for conn, _ in (hold, hold_small):  # the clients leave: the endless streams are aborted, the queued ones run
        conn.close()
    waiter.join()
    waiter_small.join()
    assert {rid: q[0] for rid, q in queued.items()} == {"queued": 200, "queued-small": 200}
    status, _, failed = post(server, "/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 3}, "failed")
    assert status == 503 and failed["error"]["code"] == "model_load_failed"
    status, _, _ = post(server, "/v1/chat/completions", {"model": "small", "messages": []}, "invalid")
    assert status == 400
    status, _, _ = post(server, "/v1/completions", {"model": "gamma", "prompt": "x"}, "missing")
    assert status == 404

    rows = rows_of(server, {"hold", "hold-small", "queued", "queued-small", "degraded", "refused", "failed", "invalid",
                            "missing"})  # fmt: skip
    hold_row = rows["hold"]
    assert (hold_row.status, hold_row.outcome, hold_row.model) == (499, "aborted", "big")
    assert hold_row.completion_tokens >= num_read > 0 and hold_row.finish_reason == "abort"
    hold_small_row = rows["hold-small"]
    assert (hold_small_row.status, hold_small_row.outcome, hold_small_row.model) == (499, "aborted", "small")
    assert rows["degraded"].outcome == "degraded" and rows["degraded"].model == "small"
    assert rows["degraded"].model_requested == "big"
    for rid, body in (("degraded", degraded), *((q, queued[q][2]) for q in ("queued", "queued-small"))):
        u = body["usage"]
        assert (rows[rid].prompt_tokens, rows[rid].completion_tokens) == (u["prompt_tokens"], u["completion_tokens"])
    assert rows["queued"].outcome == "served" and rows["queued"].model == "big"
    assert (rows["refused"].status, rows["refused"].outcome, rows["refused"].model) == (429, "rejected", None)
    assert rows["failed"].outcome == "failed" and rows["failed"].status == 503
    assert rows["failed"].model is None and rows["failed"].model_requested == "broken"
    assert (rows["missing"].status, rows["missing"].outcome) == (404, "rejected")
    assert (rows["invalid"].status, rows["invalid"].outcome) == (400, "rejected")
    for rid in ("refused", "failed", "invalid", "missing"):
        assert (rows[rid].prompt_tokens, rows[rid].completion_tokens, rows[rid].cost) == (0, 0, 0.0)


def test_the_ledger_holds_the_rows_of_the_usage_log(server):
    assert server.request("GET", "/v1/usage")[0] == 200  # flushes the ledger
    columns = "request_id, prompt_tokens, cached_tokens, completion_tokens, status, outcome, model, api"
    engine = create_engine(database_url(server.metering))
    try:
        with engine.connect() as conn:
            ledger = sorted(tuple(r) for r in conn.execute(sqlalchemy.text(f"SELECT {columns} FROM usage")))
    finally:
        engine.dispose()
    logged = sorted((r.request_id, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.status, r.outcome,
                     r.model, r.api) for r in read_usage_log(server.usage_log))  # fmt: skip
    assert ledger == logged and len(ledger) >= 13


def test_a_tenants_requests_are_its_own_rows_and_a_model_outside_its_list_is_refused(server):
    """Last against this server: once a tenant exists, every request needs a key."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert server.request("POST", "/admin/tenants", {"id": "team-a", "models": ["small"]}, admin)[0] == 201
    status, _, created = server.request("POST", "/admin/tenants/team-a/keys", {"name": "t"}, admin)
    assert status == 201
    key = {"Authorization": f"Bearer {created['key']}"}
    body = {"model": "small", "prompt": "mine", "max_tokens": 3}
    status, _, served = server.request("POST", "/v1/completions", body, {**key, "X-Request-Id": "tenant-ok"})
    assert status == 200
    status, _, refused = server.request("POST", "/v1/completions", {**body, "model": "big"},
                                        {**key, "X-Request-Id": "tenant-403"})  # fmt: skip
    assert status == 403 and refused["error"]["code"] == "model_not_allowed"
    status, _, refused = server.request("POST", "/v1/messages", {"model": "big", "max_tokens": 3, "messages": [
        {"role": "user", "content": "x"}]}, {**key, "X-Request-Id": "tenant-403-anthropic"})  # fmt: skip
    assert status == 403 and refused["error"]["type"] == "permission_error"

    rows = rows_of(server, {"tenant-ok", "tenant-403", "tenant-403-anthropic"})
    assert {(r.tenant, r.key_id) for r in rows.values()} == {("team-a", created["id"])}
    ok = rows["tenant-ok"]
    assert (ok.prompt_tokens, ok.completion_tokens) == (served["usage"]["prompt_tokens"], 3)
    for rid in ("tenant-403", "tenant-403-anthropic"):
        assert (rows[rid].status, rows[rid].outcome, rows[rid].model_requested) == (403, "rejected", "big")
        assert rows[rid].prompt_tokens == rows[rid].completion_tokens == 0
    status, _, report = server.request("GET", "/v1/usage?group_by=tenant", headers=key)
    assert status == 200
    assert [(d["tenant"], d["requests"], d["prompt_tokens"], d["completion_tokens"]) for d in report["data"]] == [
        ("team-a", 3, ok.prompt_tokens, 3)
    ]


# -- in process: a tenant limited to some models ------------------------------------------------------


class ListSink:
    def __init__(self):
        self.rows = []

    def record(self, row):
        self.rows.append(row)

    def close(self):
        pass


def test_a_model_the_tenant_may_not_use_is_a_403_in_each_apis_format_and_a_rejected_row(tiny_models):
    import httpx

    from ladle.config_file import parse_config
    from ladle.metering.tenants import Tenant, TenantDirectory, new_key
    from ladle.server.app import build_app
    from ladle.server.serve import create_state
    from ladle.server.state import ServerPhase

    model = str(tiny_models["llama"].hf_dir)
    cfg = parse_config({"models": [{"name": "alpha", "model": model}, {"name": "beta", "model": model}]})
    state = create_state(cfg)
    record, key = new_key("team-a")
    state.directory = TenantDirectory([Tenant("team-a", models=("alpha",))], [record])
    state.phase = ServerPhase.READY
    sink = ListSink()
    state.sinks.append(sink)
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": "refused"}

    async def requests():
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://ladle") as client:
            openai = await client.post("/v1/completions", json={"model": "beta", "prompt": "x"}, headers=headers)
            anthropic = await client.post("/v1/messages", headers=headers, json={
                "model": "beta", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
            kserve = await client.post("/v2/models/beta/infer", json={"inputs": []}, headers=headers)
            return openai, anthropic, kserve

    try:
        openai, anthropic, kserve = asyncio.run(requests())
    finally:
        state.registry.compute.stop()
    assert openai.status_code == 403 and openai.json()["error"]["code"] == "model_not_allowed"
    assert "may not use the model `beta`" in openai.json()["error"]["message"]
    assert anthropic.status_code == 403 and anthropic.json()["error"]["type"] == "permission_error"
    assert kserve.status_code == 403 and "may not use the model `beta`" in kserve.json()["error"]
    assert [(r.api, r.status, r.outcome, r.tenant, r.key_id) for r in sink.rows] == [
        ("/v1/completions", 403, "rejected", "team-a", record.id),
        ("/v1/messages", 403, "rejected", "team-a", record.id),
        ("/v2/models/{name}/infer", 403, "rejected", "team-a", record.id),
    ]
    assert all(r.prompt_tokens == r.completion_tokens == 0 and r.model_requested == "beta" for r in sink.rows)
