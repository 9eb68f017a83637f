"""POST /v1/embeddings in OpenAI's format.

`input`: a string, a list of strings, a list of token ids, or a list of lists of token ids (ids
are taken as given: send [CLS] ... [SEP] yourself, as vLLM takes prompt token ids). An input over
the model's maximum length is a 400 naming `input` unless `truncate` (true, or a token count) or
vLLM's `truncate_prompt_tokens` (a count, -1 for the model's maximum) is set; a text is then cut
keeping its closing [SEP], as sentence-transformers truncates. `encoding_format`: "float" (JSON
numbers) or "base64" (little-endian float32 bytes, as OpenAI's clients decode). `dimensions`: see
ladle.router.embedding. A full batching queue is a 429 with Retry-After; a queue timeout a 503.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle.engine.batcher import BatchQueueTimeout, QueueFull
from ladle.errors import InvalidRequestError
from ladle.router.endpoint import EMBED
from ladle.server.accounting import Meter, Usage, metered
from ladle.server.errors import APIError, ClientDisconnected, from_ladle_error
from ladle.server.openai_api import _until_disconnected, parse_body
from ladle.server.state import ServerState

TRUNCATE_TO_MAX = 1 << 30  # `truncate: true` / `truncate_prompt_tokens: -1`: cut at the model's maximum


INPUT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields Ladle does not use
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate: bool | int | None = None  # Ladle's: true (the model's maximum) or a token count
    truncate_prompt_tokens: int | None = None  # vLLM's: -1 for the model's maximum
    queue_timeout: float | None = Field(default=None, gt=0)  # seconds an input may wait for its batch

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value):
        def is_id(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {INPUT_SHAPES}, not empty")
        if all(isinstance(v, str) for v in value) or all(is_id(v) for v in value):
            return value
        if all(isinstance(v, list) and all(is_id(t) for t in v) for v in value):
            return value
        raise ValueError(f"must be {INPUT_SHAPES} (one kind throughout)")

    @field_validator("truncate")
    @classmethod
    def _truncate(cls, value):
        if value is not None and not isinstance(value, bool) and value < 1:
            raise ValueError("must be true or a positive token count")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_prompt_tokens(cls, value):
        if value is not None and value != -1 and value < 1:
            raise ValueError("must be -1 (the model's maximum) or a positive token count")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]
        return self.input

    def truncate_tokens(self) -> int | None:
        """The token count to cut inputs to, or None: refuse long ones."""
        if self.truncate is True or self.truncate_prompt_tokens == -1:
            return TRUNCATE_TO_MAX
        if isinstance(self.truncate, int) and self.truncate is not False:
            return self.truncate
        return self.truncate_prompt_tokens


def _encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@metered("/v1/embeddings")
async def embeddings(request: Request, meter: Meter) -> Response:
    state: ServerState = request.app.state.ladle
    body: EmbeddingRequest = await parse_body(request, EmbeddingRequest)
    meter.requesting(body.model)
    endpoint = await state.acquire(body.model, EMBED)
    request.scope["state"]["model"] = endpoint.name  # for the HTTP metrics
    meter.answered(endpoint.name)
    try:
        endpoint.check_dimensions(body.dimensions)
        batch = endpoint.prepare(body.inputs(), body.truncate_tokens())
    except InvalidRequestError as e:
        raise from_ladle_error(e) from None
    num_tokens = sum(len(ids) for ids in batch)
    state.reserve_quota(state.principal(request), request.state.request_id, num_tokens)
    vectors = await _run(request, state, endpoint, batch, body)
    state.metrics.observe_usage(endpoint.name, num_tokens, 0, 0)
    state.metrics.observe_outcome(endpoint.name, "served")
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    meter.usage = Usage(prompt_tokens=num_tokens)
    usage = {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    return JSONResponse({"object": "list", "data": data, "model": endpoint.name, "usage": usage})


async def _run(request: Request, state: ServerState, endpoint, batch: list[list[int]], body: EmbeddingRequest):
    """The vectors, or the batcher's refusal as an HTTP error; a client that leaves meanwhile
    takes its inputs out of the queue."""
    task = asyncio.create_task(endpoint.embed(batch, body.dimensions, body.queue_timeout))
    watcher = asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientDisconnected
    try:
        return task.result()
    except QueueFull as e:
        state.metrics.observe_outcome(endpoint.name, "rejected")
        raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after_s)}) from None
    except BatchQueueTimeout as e:
        state.metrics.observe_outcome(endpoint.name, "timed_out")
        raise APIError(503, str(e), code="queue_timeout", headers={"Retry-After": "1"}) from None
