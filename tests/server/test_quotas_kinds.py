"""Quotas on the non-generative APIs, in process: KServe infer counts the request (0 tokens),
/v1/embeddings its input tokens; refusals are 429s with Retry-After in each API's format."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from ladle.config import EngineConfig, LadleConfig, ModelConfig, ModelEntry, ServerConfig
from ladle.metering.quotas import Limiter, MemoryCounters
from ladle.metering.tenants import Quota, Tenant, new_key
from ladle.server.app import build_app
from ladle.server.serve import create_state, make_lifespan

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

INFER = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def _client(cfg, quotas: dict[str, Quota]):
    state = create_state(cfg)
    now_s = time.time()
    state.limiter = Limiter(MemoryCounters(), clock=lambda: now_s)  # one minute throughout
    state.sinks = [s for s in state.sinks if not isinstance(s, Limiter)] + [state.limiter]
    keys = {}
    for tenant, quota in quotas.items():
        state.directory.put(Tenant(tenant, quota=quota))
        record, keys[tenant] = new_key(tenant)
        state.directory.add_key(record)
    return TestClient(build_app(state, lifespan=make_lifespan(state, []))), keys


def _wait_ready(client) -> None:
    deadline = time.monotonic() + 180
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the models never turned ready"
        time.sleep(0.05)


def test_kserve_infer_counts_the_request(tmp_path):
    from ladle.bench.onnx_classifier import build_classifier_repository
    from ladle.router.onnx import with_tensor_models

    build_classifier_repository(tmp_path, "iris")
    cfg = with_tensor_models(LadleConfig(server=ServerConfig(warmup=False), model_repository=str(tmp_path)), ".")
    client, keys = _client(cfg, {"a": Quota(requests_per_minute=1)})
    with client:
        _wait_ready(client)
        auth = {"Authorization": f"Bearer {keys['a']}"}
        assert client.post("/v2/models/iris/infer", json=INFER, headers=auth).status_code == 200
        refused = client.post("/v2/models/iris/infer", json=INFER, headers=auth)
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.json()["error"].startswith("tenant `a` is over its requests_per_minute limit of 1")


@pytest.mark.slow
def test_embeddings_reserve_their_input_tokens():
    from ladle.model.source import resolve_embedding_model

    source = resolve_embedding_model(None)
    entry = ModelEntry(source.name, kind="embedding", engine=EngineConfig(model=ModelConfig(model=str(source.path))))
    cfg = LadleConfig(models=(entry,), server=ServerConfig(warmup=False))
    client, keys = _client(cfg, {"a": Quota(tokens_per_minute=12)})
    with client:
        _wait_ready(client)
        auth = {"Authorization": f"Bearer {keys['a']}"}
        body = {"model": source.name, "input": [101, 2023, 2003, 1037, 3231, 102]}  # 6 token ids
        assert client.post("/v1/embeddings", json=body, headers=auth).status_code == 200
        assert client.post("/v1/embeddings", json=body, headers=auth).status_code == 200  # 12 of 12
        refused = client.post("/v1/embeddings", json=body, headers=auth)
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert "tokens_per_minute limit of 12 (used 12, this request needs 6)" in error["message"]
