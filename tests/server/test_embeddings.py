"""POST /v1/embeddings against a real `ladle serve` (a tiny LLM beside the embedded MiniLM): the
official `openai` client, the sentence-transformers reference, bad input, the listings."""

from __future__ import annotations

import base64
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from openai import OpenAI

from helpers import ServerProcess, usage_rows

pytestmark = pytest.mark.slow

MODEL = "all-MiniLM-L6-v2"
ADMIN = {"Authorization": "Bearer admin-test"}
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # ~360 tokens: over 256


def varied_sentences() -> list[str]:
    """50 sentences of 1 to ~200 tokens: punctuation, unicode, numbers, code, repetition."""
    fixed = [
        "Hi",
        "?",
        "A cat.",
        "The weather in Paris is lovely in spring.",
        "Ünïcødé façade — naïve café, résumé.",
        "東京は日本の首都です。",
        "Привет, как дела?",
        "مرحبا بالعالم",
        "🙂🚀 emoji only 🎉",
        "Call 555-0100 or +44 20 7946 0958 before 9:30am.",
        "π ≈ 3.14159, e ≈ 2.71828; 1e-5 < 0.001.",
        "def f(x): return x ** 2  # squares",
        "SELECT * FROM users WHERE id = 42;",
        "!!! ??? ... ;;; ---",
        "A sentence with    odd   spacing\tand\ttabs\nand newlines.",
        "UPPER CASE and lower case and MiXeD cAsE.",
        "The year 1999 had 365 days; 2024 had 366.",
        "https://example.com/path?query=1&other=two#frag",
        'He said, "it\'s fine," and left (quietly).',
        "Dogs are loyal animals that love their owners.",
    ]
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    generated = [" ".join(words[(i + j) % len(words)] for j in range(3 + 6 * i)) + "." for i in range(20)]
    long = [" ".join(f"item {k} costs ${k * 3}.{k % 10}0," for k in range(n)) for n in (8, 12, 16, 20, 25)]
    mixed = [f"Sentence {i}: ça va? {'ok ' * i}末尾 {i * 1.5}" for i in range(5)]
    out = fixed + generated + long + mixed
    assert len(out) == 50
    return out


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    usage_log = tmp_path_factory.mktemp("embeddings") / "usage.jsonl"
    server = ServerProcess(
        "--model",
        str(tiny_models["llama"].gguf_path),
        "--embedding-max-batch-size",
        "16",
        "--embedding-max-queue-delay-ms",
        "20",
        "--admin-key",
        "admin-test",
        "--usage-log",
        str(usage_log),
    )
    server.usage_log = usage_log
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    from ladle.model.source import embedded_embedding_model_path

    return SentenceTransformer(str(embedded_embedding_model_path()), device="cpu")


def cosine_distance(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_official_client_gets_vectors_floats_and_base64_alike(client):
    r = client.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert r.object == "list" and r.model == MODEL and [d.index for d in r.data] == [0, 1]
    assert all(d.object == "embedding" and len(d.embedding) == 384 for d in r.data)
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5  # MiniLM's Normalize module
    assert r.usage.prompt_tokens == r.usage.total_tokens == 8  # [CLS] first text [SEP], twice
    # without encoding_format the client asks for base64 and decodes it itself: the same floats
    floats = client.embeddings.create(model=MODEL, input=["first text", "second text"], encoding_format="float")
    assert np.array_equal([d.embedding for d in floats.data], [d.embedding for d in r.data])
    raw = client.embeddings.create(model=MODEL, input="first text", encoding_format="base64").data[0].embedding
    assert isinstance(raw, str) and np.array_equal(np.frombuffer(base64.b64decode(raw), "<f4"), r.data[0].embedding)
    alias = client.embeddings.create(model="minilm", input="first text")
    assert alias.model == MODEL and np.allclose(alias.data[0].embedding, r.data[0].embedding)


def test_base64_is_little_endian_float32(server):
    status, _, body = server.request(
        "POST", "/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "base64"}
    )
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    _, _, floats = server.request("POST", "/v1/embeddings", {"model": MODEL, "input": "x"})
    assert list(struct.unpack("<384f", raw)) == pytest.approx(floats["data"][0]["embedding"], abs=0)


def test_fifty_sentences_equal_sentence_transformers_batched_and_alone(server, client, reference):
    sentences = varied_sentences()
    expected = reference.encode(sentences, convert_to_numpy=True, batch_size=8)
    lengths = [len(ids) for ids in reference.tokenizer(sentences)["input_ids"]]
    assert min(lengths) <= 3 and max(lengths) >= 200
    batches_before = server.metric("ladle_batch_size_count", model_name=MODEL)
    together = client.embeddings.create(model=MODEL, input=sentences)
    assert max(cosine_distance([d.embedding for d in together.data], expected)) < 1e-5
    with ThreadPoolExecutor(16) as pool:  # one request each, concurrently: batched across requests
        alone = list(pool.map(lambda s: client.embeddings.create(model=MODEL, input=s).data[0].embedding, sentences))
    assert max(cosine_distance(alone, expected)) < 1e-5
    items = server.metric("ladle_batch_size_sum", model_name=MODEL)
    batches = server.metric("ladle_batch_size_count", model_name=MODEL) - batches_before
    assert batches < 100  # 100 inputs went in fewer batches: some batches held several inputs
    assert items >= 100


def test_token_ids_in_give_the_texts_vectors(client, reference):
    ids = reference.tokenizer(["a sentence as ids", "another one"])["input_ids"]
    by_ids = client.embeddings.create(model=MODEL, input=ids)
    by_text = client.embeddings.create(model=MODEL, input=["a sentence as ids", "another one"])
    assert max(cosine_distance([d.embedding for d in by_ids.data], [d.embedding for d in by_text.data])) < 1e-6
    one = client.embeddings.create(model=MODEL, input=ids[0])
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids[0])


def test_over_length_input_is_a_400_naming_input_unless_truncate_is_set(server, reference):
    status, _, body = server.request("POST", "/v1/embeddings", {"model": MODEL, "input": ["ok", LONG]})
    assert status == 400 and body["error"]["param"] == "input"
    assert "input[1] is" in body["error"]["message"] and "maximum of 256 tokens" in body["error"]["message"]
    expected = reference.encode([LONG], convert_to_numpy=True)  # sentence-transformers cuts at 256
    for extra in ({"truncate": True}, {"truncate_prompt_tokens": -1}, {"truncate": 256}):
        status, _, body = server.request("POST", "/v1/embeddings", {"model": MODEL, "input": LONG, **extra})
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == 256
        assert cosine_distance([body["data"][0]["embedding"]], expected)[0] < 1e-5
    status, _, body = server.request("POST", "/v1/embeddings", {"model": MODEL, "input": LONG, "truncate": 10})
    assert status == 200 and body["usage"]["prompt_tokens"] == 10


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"model": "nope", "input": "x"}, 404, "model", "The model `nope` does not exist"),
        ({"input": "x"}, 400, "model", "field required"),
        ({"model": MODEL}, 400, "input", "field required"),
        ({"model": MODEL, "input": []}, 400, "input", "must be a string, a list of strings"),
        ({"model": MODEL, "input": [1, "a"]}, 400, "input", "one kind throughout"),
        ({"model": MODEL, "input": [[1, 2], []]}, 400, "input", "input[1] is an empty list of token ids"),
        ({"model": MODEL, "input": [101, 99999, 102]}, 400, "input", "token id 99999, outside the vocabulary"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "'float' or 'base64'"),
        ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "dimensions", "does not support dimensions=128"),
        ({"model": MODEL, "input": "x", "truncate": 0}, 400, "truncate", "true or a positive token count"),
        ({"model": "tiny", "input": "x"}, 400, "model", "does not serve embeddings"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param, says):
    if body.get("model") == "tiny":
        body = {**body, "model": llm_name(server)}
    got, _, reply = server.request("POST", "/v1/embeddings", body)
    assert got == status, reply
    assert reply["error"]["param"] == param and says in reply["error"]["message"], reply


def llm_name(server) -> str:
    _, _, models = server.request("GET", "/v1/models")
    return next(m["id"] for m in models["data"] if m["kind"] == "llm")


def test_malformed_json_is_a_400(server):
    status, _, body = server.request("POST", "/v1/embeddings", b'{"model": "all-MiniLM-L6-v2", "input": ')
    assert status == 400 and body["error"]["code"] == "invalid_json"


def test_chat_with_the_embedding_model_is_a_400_naming_model(server):
    status, _, body = server.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 400 and body["error"]["param"] == "model"
    assert "does not serve completions or chat" in body["error"]["message"]


def test_bad_requests_beside_good_ones_leave_the_good_ones_batch_alone(server, reference):
    sentences = varied_sentences()[:24]
    expected = reference.encode(sentences, convert_to_numpy=True)
    bad = [
        {"model": MODEL, "input": LONG},
        {"model": MODEL, "input": [5, 999999]},
        {"model": "nope", "input": "x"},
        b'{"model": "all-MiniLM',
    ]

    def send(i):
        if i % 3 == 2:
            return server.request("POST", "/v1/embeddings", bad[i % len(bad)])
        return server.request("POST", "/v1/embeddings", {"model": MODEL, "input": sentences[i]})

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(24)))
    for i, (status, _, body) in enumerate(results):
        if i % 3 == 2:
            assert status in (400, 404), body
        else:
            assert status == 200, body
            assert cosine_distance([body["data"][0]["embedding"]], expected[i : i + 1])[0] < 1e-5


def test_models_admin_and_metrics_show_the_embedding_model(server, client):
    client.embeddings.create(model=MODEL, input="for the metrics")
    _, _, models = server.request("GET", "/v1/models")
    minilm = next(m for m in models["data"] if m["id"] == MODEL)
    assert minilm["kind"] == "embedding" and minilm["tasks"] == ["embed"] and minilm["dimensions"] == 384
    assert minilm["max_model_len"] == 256 and minilm["state"] == "ready"
    assert {m["kind"] for m in models["data"]} == {"llm", "embedding"}
    status, _, admin = server.request("GET", "/admin/models", headers=ADMIN)
    assert status == 200
    described = next(m for m in admin["models"] if m["name"] == MODEL)
    assert described["kind"] == "embedding" and described["engine"]["dimensions"] == 384
    assert described["batching"]["max_batch_size"] == 16 and described["batching"]["batches"] >= 1
    assert described["memory_bytes"] > 50e6  # 22.7M float32 parameters
    for name in (
        "ladle_batch_size_count",
        "ladle_batch_queue_time_seconds_count",
        "ladle_batch_compute_time_seconds_count",
    ):
        assert server.metric(name, model_name=MODEL) >= 1
    assert server.metric("ladle_prompt_tokens_total", model_name=MODEL) > 0


def test_each_embeddings_request_is_one_usage_row_with_the_usage_it_got(server):
    body = {"model": MODEL, "input": ["A cat.", "The weather in Paris is lovely in spring."]}
    status, _, reply = server.request("POST", "/v1/embeddings", body, {"X-Request-Id": "emb-ok"})
    assert status == 200
    status, _, _ = server.request("POST", "/v1/embeddings", {**body, "input": LONG}, {"X-Request-Id": "emb-400"})
    assert status == 400
    rows = usage_rows(server.usage_log, {"emb-ok", "emb-400"})
    ok, bad = rows["emb-ok"], rows["emb-400"]
    assert (ok.api, ok.model, ok.status, ok.outcome) == ("/v1/embeddings", MODEL, 200, "served")
    assert (ok.prompt_tokens, ok.completion_tokens) == (reply["usage"]["prompt_tokens"], 0)
    assert (bad.status, bad.outcome, bad.prompt_tokens) == (400, "rejected", 0)


def test_the_llm_still_serves_beside_it(server):
    status, _, body = server.request(
        "POST", "/v1/completions", {"model": llm_name(server), "prompt": "hello", "max_tokens": 3}
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert json.dumps(body)  # a plain completion, unchanged


def test_a_full_embedding_queue_is_429_and_queued_requests_time_out(tiny_models, tmp_path):
    """Batches of 8 with a minute's delay and room for 2 queued inputs: two requests wait (seen in
    the admin API), a third is refused at once with 429 and Retry-After, and the two end at their
    8 s queue timeout with 503 queue_timeout; none is a 500."""
    import concurrent.futures
    import time

    import yaml

    from ladle.model.source import embedded_embedding_model_path

    batching = {"max_batch_size": 8, "max_queue_delay_ms": 60000, "max_queue_size": 2, "queue_timeout_s": 8}
    config = {"models": [{"name": "tiny", "model": str(tiny_models["llama"].gguf_path), "kv_cache_memory_gib": 0.02},
                         {"name": "mini", "kind": "embedding", "model": str(embedded_embedding_model_path()),
                          "batching": batching}]}  # fmt: skip
    (tmp_path / "ladle.yaml").write_text(yaml.safe_dump(config))
    held = ServerProcess("--config", str(tmp_path / "ladle.yaml"), "--admin-key", "admin-test")
    try:
        body = {"model": "mini", "input": "one sentence"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(held.request, "POST", "/v1/embeddings", body) for _ in range(2)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a state to reach, not a time to measure
                models = {m["name"]: m for m in held.request("GET", "/admin/models", headers=ADMIN)[2]["models"]}
                if models["mini"]["batching"]["queued"] == 2:
                    break
                time.sleep(0.05)
            assert models["mini"]["batching"]["queued"] == 2
            status, headers, reply = held.request("POST", "/v1/embeddings", body)
            assert status == 429 and "max_queue_size" in reply["error"]["message"], reply
            assert int(headers["retry-after"]) >= 1
            for f in waiting:
                status, _, reply = f.result()
                assert status == 503 and reply["error"]["code"] == "queue_timeout", reply
        assert held.metric("ladle_http_requests_total", status="500") == 0
    finally:
        held.stop()


def test_the_onnxruntime_runtime_equals_sentence_transformers_too(tiny_models, reference):
    """--embedding-runtime onnxruntime: the encoder exported to ONNX at load, run by ONNX Runtime,
    gives the reference's vectors (batched across concurrent requests and in one request)."""
    server = ServerProcess(
        "--model", str(tiny_models["llama"].gguf_path), "--embedding-runtime", "onnxruntime",
        "--embedding-max-queue-delay-ms", "20", "--admin-key", "admin-test",
    )  # fmt: skip
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        sentences = varied_sentences()
        expected = reference.encode(sentences, convert_to_numpy=True, batch_size=8)
        together = client.embeddings.create(model=MODEL, input=sentences)
        assert max(cosine_distance([d.embedding for d in together.data], expected)) < 1e-5
        one = lambda s: client.embeddings.create(model=MODEL, input=s).data[0].embedding  # noqa: E731
        with ThreadPoolExecutor(16) as pool:
            alone = list(pool.map(one, sentences))
        assert max(cosine_distance(alone, expected)) < 1e-5
        status, _, body = server.request("GET", "/admin/models", headers=ADMIN)
        assert status == 200
        described = next(m for m in body["models"] if m["name"] == MODEL)
        assert "ONNX Runtime" in json.dumps(described)
    finally:
        server.stop()
