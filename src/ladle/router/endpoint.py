"""What the HTTP layer sees of anything that serves a model: the Endpoint protocol.

An in-process LLM engine (`LocalLLM`) is the first kind; an upstream OpenAI-compatible server is
the second; embedding and tensor models come later. Handlers get an endpoint from the router and
never reach inside an engine.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from ladle.config import ModelEntry
from ladle.engine.load import LoadSnapshot
from ladle.engine.outputs import RequestOutput
from ladle.engine.request import GenerateRequest
from ladle.errors import LadleError
from ladle.sample.params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")

GENERATE = "generate"  # tasks an endpoint may serve: text generation (LLMs)
EMBED = "embed"  # vectors of texts (embedding models: /v1/embeddings)
INFER = "infer"  # tensors in, tensors out (ONNX models: KServe v2)
TASK_NAMES = {GENERATE: "completions or chat", EMBED: "embeddings", INFER: "tensor inference"}  # for errors


class Phase(enum.Enum):
    UNLOADED = "unloaded"  # declared, not loaded (not yet, evicted, or idle-unloaded): loads on demand
    LOADING = "loading"  # the model is loading
    WARMING = "warming"  # loaded, running its warm-up passes
    READY = "ready"  # serving
    DRAINING = "draining"  # finishing its requests before it unloads; new ones go elsewhere or wait
    FAILED = "failed"  # loading failed: `failure` says why


@dataclass(frozen=True)
class EndpointStatus:
    phase: Phase
    failure: str | None = None  # why it failed to load
    ready_since_s: float | None = None  # wall-clock time it became ready
    last_used_s: float | None = None  # monotonic time of its last request
    memory_bytes: int = 0  # weights and KV cache while loaded
    num_in_flight: int = 0  # requests it is serving now


@runtime_checkable
class Endpoint(Protocol):
    """Anything that serves a model."""

    name: str
    kind: str  # "llm", "embedding", "onnx" (in-process: config.MODEL_KINDS), "upstream"
    tasks: frozenset[str]  # GENERATE, EMBED, INFER
    entry: ModelEntry  # its config
    phase: Phase
    failure: str | None
    memory_bytes: int
    last_used_s: float | None
    num_in_flight: int
    removing: bool  # the admin API is removing it

    @property
    def is_loaded(self) -> bool:
        """It holds a loaded model (ready, warming up or draining)."""

    @property
    def num_unfinished(self) -> int:
        """Requests it has accepted and not finished (a drain waits for them)."""

    def summary(self) -> str:
        """One line for the log once it is ready: the model, its weights, its device."""

    def status(self) -> EndpointStatus: ...

    def load(self) -> LoadSnapshot | None:
        """The live load estimate (None where nothing is measured, as for an upstream)."""

    async def start(self) -> None:
        """Load and warm up; the phase says how far it got, `failure` why it stopped."""

    async def drain(self, timeout_s: float) -> None:
        """Take no new requests; wait up to timeout_s for those in flight, then abort the rest."""

    async def close(self) -> None:
        """Release what it holds (engine, memory, connections)."""


@runtime_checkable
class GenerateEndpoint(Endpoint, Protocol):
    """An endpoint that generates from token ids in this process: the handlers tokenize with its
    tokenizer, validate, then stream its RequestOutput deltas."""

    tokenizer: object
    max_model_len: int

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    async def prepare(self, params: SamplingParams) -> None:
        """Make what the request needs ready off the engine's loop (its output grammar, compiled);
        raises InvalidRequestError where it cannot be."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...


class LocalEndpoint:
    """What every in-process endpoint keeps of its lifecycle (LocalLLM, EmbeddingEndpoint,
    OnnxEndpoint): the phase and why it failed, when it was ready and last used, what it holds."""

    def __init__(self, entry: ModelEntry):
        self.entry = entry
        self.name = entry.name
        self.phase = Phase.UNLOADED
        self.failure: str | None = None
        self.failed_by_bug = False  # the failure was an unexpected exception, not a user error
        self.ready_since_s: float | None = None
        self.last_used_s: float | None = None
        self.num_in_flight = 0
        self.memory_bytes = 0
        self.removing = False  # the admin API is removing it: no new requests

    async def _loading(self, load: Awaitable[T]) -> T | None:
        """Phase LOADING while `load` runs; its result, or None with the phase FAILED and why (a
        LadleError says what the user got wrong; anything else is a bug, logged with its traceback)."""
        self.phase, self.failure, self.failed_by_bug = Phase.LOADING, None, False
        try:
            return await load
        except LadleError as e:
            self._failed(str(e))
        except Exception as e:
            log.exception("loading model %s failed", self.name)
            self._failed(f"{type(e).__name__}: {e}", bug=True)
        return None

    def _failed(self, message: str, bug: bool = False) -> None:
        self.phase, self.failure, self.failed_by_bug = Phase.FAILED, message, bug
        log.info("model %s failed to load: %s", self.name, message)

    def _unloaded(self) -> None:
        if self.phase != Phase.FAILED:
            self.phase = Phase.UNLOADED
        self.memory_bytes, self.ready_since_s = 0, None

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            self.phase, self.failure, self.ready_since_s, self.last_used_s, self.memory_bytes, self.num_in_flight
        )


class BatchedEndpoint(LocalEndpoint):
    """An in-process endpoint whose requests go through a DynamicBatcher (embeddings, tensor
    models): its back-pressure is the batcher's bounded queue, not a load estimate."""

    batcher = None  # DynamicBatcher while loaded

    @property
    def is_loaded(self) -> bool:
        return self.batcher is not None

    @property
    def num_unfinished(self) -> int:
        return self.num_in_flight

    @property
    def num_queued(self) -> int:
        return self.batcher.num_queued if self.batcher is not None else 0

    def load(self) -> LoadSnapshot | None:
        return None

    async def drain(self, timeout_s: float) -> None:
        if not self.is_loaded:
            return
        self.phase = Phase.DRAINING
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _close_batcher(self) -> None:
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            await batcher.close()

    async def _submit_all(self, batcher, items: list[tuple[object, int]], timeout_s: float | None = None) -> list:
        """Each (payload, size) through the batcher, counted in flight meanwhile."""
        self.num_in_flight += 1
        self.last_used_s = time.monotonic()
        try:
            return list(await asyncio.gather(*(batcher.submit(p, size, timeout_s) for p, size in items)))
        finally:
            self.num_in_flight -= 1
            self.last_used_s = time.monotonic()
