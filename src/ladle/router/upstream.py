"""An OpenAI-compatible server (a managed API, another Ladle) as an Endpoint: requests are passed
through with the upstream's model name, streams unchanged, and the usage it reports is read back
so it is counted like local usage. httpx with timeouts; one connection pool per upstream."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from ladle.config import UpstreamConfig
from ladle.router.endpoint import GENERATE, EndpointStatus, Phase

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The upstream could not be reached or failed; the client gets a 502."""


@dataclass
class Forwarded:
    """An upstream's answer: status, the headers worth passing on, and the body (bytes, or an
    async iterator of SSE bytes for a stream); `usage` fills in as the body is read."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes]
    usage: dict = field(default_factory=dict)


class Upstream:
    kind = "upstream"
    tasks = frozenset({GENERATE})

    def __init__(self, config: UpstreamConfig):
        self.config = config
        self.name = config.name
        key = config.api_key or (os.environ.get(config.api_key_env) if config.api_key_env else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        self.client = httpx.AsyncClient(base_url=config.url.rstrip("/") + "/", headers=headers, timeout=timeout)
        self.last_used_s: float | None = None
        self.num_in_flight = 0
        self.last_error: str | None = None

    def status(self) -> EndpointStatus:
        return EndpointStatus(Phase.READY, self.last_error, None, self.last_used_s, 0, self.num_in_flight)

    def load(self):
        return None  # nothing measured: an upstream's capacity is its own

    async def start(self) -> None:
        return None

    async def drain(self, timeout_s: float) -> None:
        return None

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(self, path: str, body: dict, requested: str | None) -> Forwarded:
        """POST body to path (e.g. "chat/completions") with the upstream's model name; a stream's
        bytes pass through as they come, except a usage chunk Ladle asked for itself."""
        payload = {**body, "model": self.config.model or requested or body.get("model")}
        stream = bool(payload.get("stream"))
        client_wants_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        if stream:
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        self.last_used_s = time.monotonic()
        try:
            request = self.client.build_request("POST", path, json=payload)
            response = await self.client.send(request, stream=stream)
        except httpx.HTTPError as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise UpstreamError(f"upstream {self.name} ({self.config.url}) failed: {self.last_error}") from None
        headers = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "retry-after")}
        if not stream or response.status_code != 200:
            content = await response.aread() if stream else response.content
            await response.aclose()
            usage = _usage_of(content) if response.status_code == 200 else {}
            return Forwarded(response.status_code, headers, content, usage)
        forwarded = Forwarded(200, headers, b"")
        forwarded.body = self._relay(response, forwarded, client_wants_usage)
        return forwarded

    async def _relay(self, response: httpx.Response, forwarded: Forwarded, keep_usage: bool) -> AsyncIterator[bytes]:
        self.num_in_flight += 1
        try:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        forwarded.usage = chunk["usage"]
                        if not keep_usage and not chunk.get("choices"):
                            continue  # the usage chunk Ladle asked for: counted, not passed on
                    elif not keep_usage and "usage" in chunk:
                        del chunk["usage"]
                        line = "data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
                yield (line + "\n").encode()
        except httpx.HTTPError as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("upstream %s stream broke: %s", self.name, self.last_error)
        finally:
            self.num_in_flight -= 1
            await response.aclose()


def _usage_of(content: bytes) -> dict:
    try:
        return json.loads(content).get("usage") or {}
    except (ValueError, AttributeError):
        return {}
