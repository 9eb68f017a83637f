"""What the HTTP layer sees of anything that serves a model: the Endpoint protocol.

An in-process LLM engine (`LocalLLM`) is the first kind; an upstream OpenAI-compatible server is
the second; embedding and tensor models come later. Handlers get an endpoint from the router and
never reach inside an engine.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ladle.config import ModelEntry
from ladle.engine.load import LoadSnapshot
from ladle.engine.outputs import RequestOutput
from ladle.engine.request import GenerateRequest
from ladle.sample.params import SamplingParams

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
