"""Picking the endpoint of a request: by name or alias, then admission against the model's
latency targets with degradation along `degrade_to`, then the model's upstream fallback, then
429 (docs/serving-layer.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ladle.config import LadleConfig
from ladle.errors import LadleError
from ladle.router.admission import Verdict, judge, retry_after_s
from ladle.router.complexity import Features, decide
from ladle.router.endpoint import GENERATE, Phase
from ladle.router.local import LocalLLM
from ladle.router.registry import ModelNotFound, ModelUnavailable, Registry
from ladle.router.upstream import Upstream


class Overloaded(LadleError):
    """The request would wait too long, or the model's queue is full: 429 with Retry-After."""

    def __init__(self, name: str, message: str, retry_after_s: int):
        self.name, self.retry_after_s = name, retry_after_s
        super().__init__(message)


@dataclass(frozen=True)
class Pick:
    """The model a request's name reaches (through an `auto` router or not), before admission."""

    endpoint: LocalLLM | Upstream  # an upstream where the local model is failing and has a fallback
    requested: str | None  # the name the request gave
    reason: str  # why this model


@dataclass(frozen=True)
class Route:
    endpoint: LocalLLM | Upstream  # what serves the request
    requested: str | None  # the name the request gave
    reason: str  # why this endpoint, for X-Ladle-Route-Reason
    outcome: str = "served"  # served, degraded, fell_back
    start_within_s: float | None = None  # the request must start computing this soon (its TTFT target)

    @property
    def name(self) -> str:
        return self.endpoint.name


class Router:
    def __init__(self, config: LadleConfig, registry: Registry):
        self.config = config
        self.registry = registry
        self.routers = {r.name: r for r in config.routers}

    @property
    def served_names(self) -> list[str]:
        return [*self.registry.served_names, *self.routers]

    async def resolve(self, requested: str | None, features: Features | None = None) -> Pick:
        """The ready generating model a name, an alias or a router reaches (None: the default
        model), loading it if need be; raises ModelNotFound, WrongTask (a model that does not
        generate) or ModelUnavailable. Its tokenizer then prepares the request. Non-generative
        models are looked up by name alone (Registry.acquire): admission is for LLMs."""
        router = self.routers.get(requested) if requested is not None else None
        if router is not None:
            decision = decide(features or Features(""), router)
            return Pick(await self.registry.acquire(decision.model, GENERATE), requested, decision.reason)
        if requested is not None and requested not in self.registry:
            raise ModelNotFound(requested, self.served_names)
        try:
            endpoint = await self.registry.acquire(requested, GENERATE)
        except ModelUnavailable as e:
            upstream = self._fallback(self.registry.resolve(requested))
            if upstream is None:
                raise
            return Pick(upstream, requested, f"fell back to upstream {upstream.name}: {e}")
        if requested is None:
            reason = "default model"
        else:
            reason = "requested" if requested == endpoint.name else f"alias of {endpoint.name}"
        return Pick(endpoint, requested, reason)

    def admit(self, pick: Pick, prompt_tokens: int) -> Route:
        """Where a prepared request of prompt_tokens goes: its model if the prediction meets the
        model's targets, else the first of its `degrade_to` chain that does; else Overloaded
        (429) with the Retry-After of the model's excess."""
        endpoint, requested, reason = pick.endpoint, pick.requested, pick.reason
        if isinstance(endpoint, Upstream):
            return Route(endpoint, requested, reason, outcome="fell_back")
        first = self._judge(endpoint, prompt_tokens)
        if first.ok:
            return Route(endpoint, requested, reason, start_within_s=first.start_within_s)
        for smaller in self._degrade_chain(endpoint):
            verdict = self._judge(smaller, prompt_tokens)
            if verdict.ok:
                why = f"degraded from {endpoint.name}: {first.reason}"
                return Route(smaller, requested, why, "degraded", verdict.start_within_s)
        upstream = self._fallback(endpoint)
        if upstream is not None:
            return Route(upstream, requested, f"fell back to upstream {upstream.name}: {first.reason}", "fell_back")
        raise Overloaded(
            endpoint.name,
            f"the model `{endpoint.name}` is overloaded: {first.reason}; retry after the delay given in Retry-After",
            retry_after_s(first, self.config.admission),
        )

    def retry_after(self, endpoint: LocalLLM, prompt_tokens: int) -> int:
        """Retry-After for a request of prompt_tokens the model could not start in time: the
        excess at the model's load now (the bound's minimum where it fits again)."""
        return retry_after_s(self._judge(endpoint, prompt_tokens), self.config.admission)

    def _judge(self, endpoint: LocalLLM, prompt_tokens: int) -> Verdict:
        return judge(endpoint.entry, endpoint.load(), endpoint.num_waiting, prompt_tokens, self.config.admission)

    def _fallback(self, endpoint: LocalLLM) -> Upstream | None:
        name = endpoint.entry.fallback
        return self.registry.upstreams.get(name) if name is not None else None

    def _degrade_chain(self, endpoint: LocalLLM) -> list[LocalLLM]:
        """The ready models `degrade_to` leads to, in order (a cycle ends the chain)."""
        chain, seen = [], {endpoint.name}
        name = endpoint.entry.degrade_to
        while name is not None and name not in seen and name in self.registry:
            seen.add(name)
            target = self.registry.resolve(name)
            if target.phase == Phase.READY:
                chain.append(target)
            name = target.entry.degrade_to
        return chain
