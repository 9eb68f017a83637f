"""Picking the endpoint of a request: by name or alias now; `auto` routers, latency-target
admission, degradation and upstream fallback plug in here (docs/serving-layer.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ladle.config import LadleConfig
from ladle.errors import LadleError
from ladle.router.local import LocalLLM
from ladle.router.registry import Registry


class Overloaded(LadleError):
    """The request would wait too long, or the model's queue is full: 429 with Retry-After."""

    def __init__(self, name: str, message: str, retry_after_s: int):
        self.name, self.retry_after_s = name, retry_after_s
        super().__init__(message)


@dataclass(frozen=True)
class Route:
    endpoint: LocalLLM  # what serves the request
    requested: str | None  # the name the request gave
    reason: str  # why this endpoint, for X-Ladle-Route-Reason
    outcome: str = "served"  # served, degraded, fell_back

    @property
    def name(self) -> str:
        return self.endpoint.name


class Router:
    def __init__(self, config: LadleConfig, registry: Registry):
        self.config = config
        self.registry = registry

    async def resolve(self, requested: str | None) -> LocalLLM:
        """The ready endpoint a name or alias reaches (None: the default model), loading it if
        need be; raises ModelNotFound or ModelUnavailable. Its tokenizer prepares the request."""
        return await self.registry.acquire(requested)

    def admit(self, endpoint: LocalLLM, requested: str | None, prompt_tokens: int) -> Route:
        """Where a prepared request of prompt_tokens goes; raises Overloaded."""
        if requested is None:
            reason = "default model"
        else:
            reason = "requested" if requested == endpoint.name else f"alias of {endpoint.name}"
        self._check_queue(endpoint, prompt_tokens)
        return Route(endpoint, requested, reason)

    def _check_queue(self, endpoint: LocalLLM, prompt_tokens: int) -> None:
        entry = endpoint.entry
        load = endpoint.load()
        waiting = endpoint.num_waiting
        if waiting >= entry.max_waiting_requests:
            raise Overloaded(
                endpoint.name,
                f"the model `{endpoint.name}` is overloaded: {waiting} requests are already waiting "
                f"(limit {entry.max_waiting_requests}); retry after the delay given in Retry-After",
                retry_after_s=self.retry_after_s(load),
            )
        if load is not None and load.backlog_tokens + prompt_tokens > entry.max_waiting_prompt_tokens:
            raise Overloaded(
                endpoint.name,
                f"the model `{endpoint.name}` is overloaded: {load.backlog_tokens} prompt tokens are already "
                f"waiting (limit {entry.max_waiting_prompt_tokens})",
                retry_after_s=self.retry_after_s(load),
            )

    def retry_after_s(self, load, excess_s: float | None = None) -> int:
        """When to come back: the time the measured drain rate needs to clear the excess (the
        whole backlog when no excess is given), within the configured bounds."""
        cfg = self.config.admission
        if load is None or not load.is_measured:
            return cfg.min_retry_after_s
        if excess_s is None:
            rate = load.drain_tokens_per_s
            excess_s = load.backlog_tokens / rate if rate > 0 else cfg.max_retry_after_s
        return int(min(cfg.max_retry_after_s, max(cfg.min_retry_after_s, -(-excess_s // 1))))
