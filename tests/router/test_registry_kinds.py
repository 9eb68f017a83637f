"""The registry builds each model entry by its kind, and a request for the wrong task is refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ladle.config import BatchingConfig, LadleConfig, ModelEntry
from ladle.engine.compute import ComputeLoop
from ladle.errors import InvalidRequestError
from ladle.router.embedding import EmbeddingEndpoint
from ladle.router.endpoint import EMBED, GENERATE, Phase
from ladle.router.local import LocalLLM
from ladle.router.registry import Registry, WrongTask

pytestmark = pytest.mark.slow


def test_an_embedding_entry_is_served_by_the_embedding_endpoint_and_batches():
    cfg = LadleConfig(
        models=(
            ModelEntry("llm", load_at_start=False),
            ModelEntry("emb", kind="embedding", batching=BatchingConfig(max_batch_size=4, max_queue_delay_ms=50)),
        )
    )
    compute = ComputeLoop().start()
    records = []

    async def main():
        registry = Registry(cfg, compute, warmup=False, observe_batch=lambda name, r: records.append((name, r)))
        assert isinstance(registry.resolve("llm"), LocalLLM)
        assert isinstance(registry.resolve("emb"), EmbeddingEndpoint)
        try:
            emb = await registry.acquire("emb", EMBED)
            assert emb.phase == Phase.READY and emb.memory_bytes > 50e6
            with pytest.raises(WrongTask, match="the model `emb` does not serve completions or chat"):
                await registry.acquire("emb", GENERATE)
            ids = emb.prepare(["one", "two", "three", "four five six"], truncate=None)
            vectors = await emb.embed(ids)
            with pytest.raises(InvalidRequestError, match="maximum of 256 tokens") as long:
                emb.prepare(["word " * 300], truncate=None)
            assert long.value.param == "input"
            assert len(emb.prepare(["word " * 300], truncate=1 << 30)[0]) == 256
            with pytest.raises(InvalidRequestError) as dims:
                emb.check_dimensions(128)
            assert dims.value.param == "dimensions"
            return vectors
        finally:
            await registry.close()

    try:
        vectors = asyncio.run(main())
    finally:
        compute.stop()
    assert len(vectors) == 4 and all(v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert [(name, r.batch_size) for name, r in records] == [("emb", 4)]  # four inputs, one batch
