"""An in-process LLM engine as an Endpoint: built on the shared ComputeLoop, warmed up with real
forward passes, drained before it unloads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from ladle.config import ModelEntry
from ladle.engine.compute import ComputeLoop
from ladle.engine.load import LoadSnapshot
from ladle.engine.outputs import RequestOutput
from ladle.engine.request import GenerateRequest
from ladle.router.endpoint import GENERATE, LocalEndpoint, Phase
from ladle.sample.params import SamplingParams

log = logging.getLogger(__name__)

WARMUP_PROMPT_LENGTHS = (8, 200)  # without warmup_prompts: a short and a longer prefill, then decodes
WARMUP_OUTPUT_TOKENS = 4


class LocalLLM(LocalEndpoint):
    kind = "llm"
    tasks = frozenset({GENERATE})

    def __init__(self, entry: ModelEntry, compute: ComputeLoop, warmup: bool = True):
        super().__init__(entry)
        self.compute = compute
        self.warmup = warmup
        self.engine = None  # AsyncEngine while loaded

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self.engine = await self._loading(asyncio.to_thread(self._launch))
        if self.engine is None:
            return
        info = self.engine.engine.info
        self.memory_bytes = info.weight_bytes + info.kv_cache_bytes
        self.phase = Phase.WARMING
        if self.warmup:
            await self._warm_up()
        self.phase, self.ready_since_s = Phase.READY, time.time()

    def _launch(self):
        from ladle.engine.async_engine import AsyncEngine
        from ladle.engine.llm import build_engine

        engine = self.entry.engine
        config = dataclasses.replace(engine, model=dataclasses.replace(engine.model, served_name=self.name))
        return AsyncEngine.launch(lambda: build_engine(config, between=self.compute.share), self.compute)

    async def _warm_up(self) -> None:
        """Real forward passes of the shapes serving will see, then an empty prefix cache."""
        params = SamplingParams(temperature=0, max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True)
        tok = self.engine.engine.tokenizer
        limit = self.max_model_len - WARMUP_OUTPUT_TOKENS
        if self.entry.warmup_prompts:
            prompts = [tok.encode(p)[:limit] for p in self.entry.warmup_prompts]
        else:
            prompts = [[(7 + 13 * j) % tok.vocab_size for j in range(min(n, limit))] for n in WARMUP_PROMPT_LENGTHS]

        async def one(i, ids):
            async for _ in self.engine.generate(GenerateRequest(f"warmup-{i}", ids, params)):
                pass

        started = time.monotonic()
        await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
        await self.engine.reset_prefix_cache()
        log.info("%s: warm-up done in %.1f s", self.name, time.monotonic() - started)

    async def drain(self, timeout_s: float) -> None:
        if self.engine is None:
            return
        self.phase = Phase.DRAINING
        deadline = time.monotonic() + timeout_s
        while self.engine.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_unfinished:
            log.info("%s: aborting %d requests still running after the drain", self.name, self.engine.num_unfinished)
            self.engine.abort_all()
            stop_at = time.monotonic() + 5
            while self.engine.num_unfinished and time.monotonic() < stop_at:
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        self._unloaded()

    # -- state -------------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self.engine is not None

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished if self.engine is not None else 0

    def summary(self) -> str:
        info = self.engine.engine.info
        return (
            f"{info.model_name} ({info.weights_description} on {info.device}, {info.attention_backend} attention, "
            f"KV cache {info.kv_capacity_tokens} tokens, context {info.max_model_len})"
        )

    def load(self) -> LoadSnapshot | None:
        return self.engine.load() if self.engine is not None else None

    @property
    def info(self):
        return self.engine.engine.info if self.engine is not None else None

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def stats(self):
        return self.engine.engine.stats if self.engine is not None else None

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting if self.engine is not None else 0

    # -- requests ----------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    async def prepare(self, params: SamplingParams) -> None:
        if params.structured is not None:
            await self.engine.compile_grammar(params.structured)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        self.num_in_flight += 1
        self.last_used_s = time.monotonic()
        try:
            async for out in engine.generate(request):
                yield out
        finally:
            self.num_in_flight -= 1
            self.last_used_s = time.monotonic()

    def reserve(self, request: GenerateRequest) -> None:
        """Count an admitted request as queued until generate() submits it (see AsyncEngine.reserve)."""
        if self.engine is not None:
            self.engine.reserve(request)

    def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)
