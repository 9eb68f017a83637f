"""The models a server serves, by name and alias: loading at start or on demand, a memory budget
that evicts the least recently used unpinned model, idle unloading, and models added or removed at
runtime (the admin API)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ladle.config import LadleConfig, ModelEntry
from ladle.engine.batcher import BatchRecord
from ladle.engine.compute import ComputeLoop
from ladle.errors import LadleError
from ladle.router.embedding import EmbeddingEndpoint
from ladle.router.endpoint import TASK_NAMES, Endpoint, Phase
from ladle.router.local import LocalLLM
from ladle.router.upstream import Upstream

log = logging.getLogger(__name__)

GIB = 1 << 30
IDLE_CHECK_S = 1.0  # how often idle models are looked for


class ModelNotFound(LadleError):
    def __init__(self, requested: str, served: list[str]):
        self.requested, self.served = requested, served
        names = ", ".join(f"`{n}`" for n in served) or "no models"
        super().__init__(f"The model `{requested}` does not exist. This server serves {names}.")


class ModelUnavailable(LadleError):
    """The model exists but cannot serve: it failed to load, or did not get ready in time."""

    def __init__(self, name: str, message: str, code: str, retry_after_s: int | None = None):
        self.name, self.code, self.retry_after_s = name, code, retry_after_s
        super().__init__(message)


class WrongTask(LadleError):
    """The model exists but serves another task (an embedding model asked to chat): a 400."""

    def __init__(self, name: str, task: str):
        self.name, self.task = name, task
        super().__init__(f"the model `{name}` does not serve {TASK_NAMES.get(task, task)}")


@dataclass(frozen=True)
class EndpointContext:
    """What the registry gives every endpoint it builds, whatever its kind."""

    compute: ComputeLoop  # the one compute thread of the process
    warmup: bool  # run warm-up passes before turning ready
    observe_batch: Callable[[str, BatchRecord], None]  # a batcher's per-batch record, by model name


def _local_llm(entry: ModelEntry, context: EndpointContext) -> Endpoint:
    return LocalLLM(entry, context.compute, context.warmup)


def _embedding(entry: ModelEntry, context: EndpointContext) -> Endpoint:
    return EmbeddingEndpoint(entry, context.compute, context.warmup, context.observe_batch)


def _onnx(entry: ModelEntry, context: EndpointContext) -> Endpoint:
    from ladle.router.onnx import OnnxEndpoint

    return OnnxEndpoint(entry, context.observe_batch, context.warmup)


def endpoint_creators() -> dict[str, Callable[[ModelEntry, EndpointContext], Endpoint]]:
    """How each ModelEntry.kind (config.MODEL_KINDS) is served: one creator per kind."""
    return {
        "llm": _local_llm,
        "embedding": _embedding,
        "onnx": _onnx,
    }


class Registry:
    def __init__(
        self,
        config: LadleConfig,
        compute: ComputeLoop,
        warmup: bool = True,
        on_loaded: Callable[[Endpoint], None] | None = None,
        on_unloaded: Callable[[Endpoint], None] | None = None,
        observe_batch: Callable[[str, BatchRecord], None] | None = None,
    ):
        self.config = config
        self.compute = compute
        self.warmup = warmup
        self.on_loaded = on_loaded or (lambda ep: None)
        self.on_unloaded = on_unloaded or (lambda ep: None)
        self.context = EndpointContext(compute, warmup, observe_batch or (lambda name, record: None))
        self.creators = endpoint_creators()
        self.endpoints: dict[str, Endpoint] = {}  # by name, in declaration order
        self.upstreams = {u.name: Upstream(u) for u in config.upstreams}  # fallbacks, by name
        self._names: dict[str, str] = {}  # name or alias -> name
        self._loading: dict[str, asyncio.Task] = {}
        self.held: set[str] = set()  # unloaded on purpose (the repository API): not loaded on demand
        self._lock = asyncio.Lock()  # one load or unload decision at a time
        self._idle_task: asyncio.Task | None = None
        for entry in config.models:
            self._declare(entry)

    # -- names -------------------------------------------------------------------------------------

    def _declare(self, entry: ModelEntry) -> Endpoint:
        for name in entry.names:
            if name in self._names:
                raise LadleError(f"the name {name!r} is already served (by model {self._names[name]!r})")
        create = self.creators.get(entry.kind)
        if create is None:
            raise LadleError(f"model {entry.name!r}: kind {entry.kind!r} is not served by this build of Ladle")
        endpoint = create(entry, self.context)
        self.endpoints[entry.name] = endpoint
        for name in entry.names:
            self._names[name] = entry.name
        return endpoint

    @property
    def served_names(self) -> list[str]:
        return list(self.endpoints)

    @property
    def default_name(self) -> str | None:
        """The model a request that names none gets: the first declared."""
        return next(iter(self.endpoints), None)

    def resolve(self, requested: str | None) -> Endpoint:
        name = self._names.get(requested if requested is not None else self.default_name or "")
        if name is None:
            raise ModelNotFound(requested or "", self.served_names)
        return self.endpoints[name]

    def __contains__(self, requested: str) -> bool:
        return requested in self._names

    # -- loading -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models marked load_at_start, as many as the budget allows, in order; then
        watch for idle ones."""
        for endpoint in list(self.endpoints.values()):
            if endpoint.entry.load_at_start:
                await self.load_in_background(endpoint.name)
        self._idle_task = asyncio.create_task(self._unload_idle())

    async def acquire(self, requested: str | None, task: str | None = None) -> Endpoint:
        """The ready endpoint for a request: a model still loading is waited for (up to
        load_wait_s), an unloaded one is loaded first. With a task, a model that does not serve it
        raises WrongTask."""
        endpoint = self.resolve(requested)
        if task is not None and task not in endpoint.tasks:
            raise WrongTask(endpoint.name, task)
        if endpoint.removing:
            raise ModelUnavailable(endpoint.name, f"the model `{endpoint.name}` is being removed", "model_removed")
        if endpoint.phase == Phase.READY:
            endpoint.last_used_s = time.monotonic()
            return endpoint
        if endpoint.phase == Phase.FAILED:
            raise ModelUnavailable(
                endpoint.name, f"the model `{endpoint.name}` failed to load: {endpoint.failure}", "model_load_failed"
            )
        if endpoint.name in self.held and not endpoint.is_loaded:
            raise ModelUnavailable(
                endpoint.name,
                f"the model `{endpoint.name}` was unloaded through the model repository API: load it again with "
                f"POST /v2/repository/models/{endpoint.name}/load",
                "model_unloaded",
            )
        if endpoint.phase in (Phase.UNLOADED, Phase.DRAINING):
            self.load_in_background(endpoint.name)
        wait_s = self.config.registry.load_wait_s
        try:
            await asyncio.wait_for(self._ready(endpoint), wait_s)
        except TimeoutError:
            raise ModelUnavailable(
                endpoint.name,
                f"the model `{endpoint.name}` is {endpoint.phase.value} and was not ready within {wait_s:.0f} s",
                "model_not_ready",
                retry_after_s=5,
            ) from None
        return await self.acquire(requested, task)

    async def _ready(self, endpoint: Endpoint) -> None:
        while endpoint.phase not in (Phase.READY, Phase.FAILED):
            task = self._loading.get(endpoint.name)
            if task is not None:
                await asyncio.shield(task)
            elif endpoint.phase == Phase.UNLOADED:
                self.load_in_background(endpoint.name)
            else:
                await asyncio.sleep(0.05)

    def load_in_background(self, name: str) -> asyncio.Task:
        """The task loading a model (started now unless one runs); its phase is `loading` at once."""
        task = self._loading.get(name)
        if task is None or task.done():
            endpoint = self.endpoints[name]
            if not endpoint.is_loaded:
                endpoint.phase = Phase.LOADING
            task = self._loading[name] = asyncio.create_task(self._load(endpoint))
        return task

    async def _load(self, endpoint: Endpoint) -> None:
        async with self._lock:
            if endpoint.is_loaded:  # loaded meanwhile
                return
            while self._over_budget(adding=endpoint):
                victim = self._eviction_candidate(exclude=endpoint)
                if victim is None:
                    log.warning("loading %s exceeds the memory budget: nothing left to evict", endpoint.name)
                    break
                log.info("evicting %s (least recently used) to load %s", victim.name, endpoint.name)
                await self._unload(victim)
            endpoint.phase = Phase.LOADING  # from here its waiters see it loading
        await endpoint.start()
        if endpoint.phase == Phase.READY:
            self.on_loaded(endpoint)
        self._loading.pop(endpoint.name, None)

    def _loaded(self) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.phase in (Phase.LOADING, Phase.WARMING, Phase.READY)]

    def _over_budget(self, adding: Endpoint) -> bool:
        budget = self.config.registry
        loaded = [e for e in self._loaded() if e is not adding]
        if budget.max_loaded_models is not None and len(loaded) + 1 > budget.max_loaded_models:
            return True
        if budget.max_loaded_gib is not None and loaded:
            used = sum(e.memory_bytes for e in loaded)
            return used + max(adding.memory_bytes, 1) > budget.max_loaded_gib * GIB
        return False

    def _eviction_candidate(self, exclude: Endpoint) -> Endpoint | None:
        candidates = [e for e in self._loaded() if e is not exclude and not e.entry.pinned and e.phase == Phase.READY]
        return min(candidates, key=lambda e: e.last_used_s or 0.0, default=None)

    # -- unloading ---------------------------------------------------------------------------------

    async def unload(self, name: str, hold: bool = False) -> None:
        """Drain and unload a model; with hold, it stays unloaded until load() (as Triton's
        explicit model control), else the next request loads it again."""
        endpoint = self.resolve(name)
        if hold:
            self.held.add(endpoint.name)
        async with self._lock:
            await self._unload(endpoint)

    async def load(self, name: str) -> None:
        """Load a model (one held unloaded too) and wait until it is ready or failed."""
        endpoint = self.resolve(name)
        self.held.discard(endpoint.name)
        if endpoint.phase != Phase.READY:
            await self.load_in_background(endpoint.name)

    async def _unload(self, endpoint: Endpoint) -> None:
        await endpoint.drain(self.config.server.drain_timeout_s)
        self.on_unloaded(endpoint)
        await endpoint.close()

    async def _unload_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for endpoint in list(self.endpoints.values()):
                idle_s = endpoint.entry.idle_unload_s
                if idle_s is None or endpoint.entry.pinned or endpoint.phase != Phase.READY:
                    continue
                if endpoint.num_in_flight == 0 and now - (endpoint.last_used_s or now) >= idle_s:
                    log.info("unloading %s: idle for %.0f s", endpoint.name, idle_s)
                    async with self._lock:
                        if endpoint.phase == Phase.READY and endpoint.num_in_flight == 0:
                            await self._unload(endpoint)

    # -- runtime changes ---------------------------------------------------------------------------

    async def add(self, entry: ModelEntry) -> Endpoint:
        """Declare a model at runtime and start loading it; it is routable once ready."""
        if entry.degrade_to is not None and entry.degrade_to not in self.endpoints:
            raise LadleError(f"degrade_to {entry.degrade_to!r} is not a served model")
        endpoint = self._declare(entry)
        self.load_in_background(entry.name)
        return endpoint

    async def remove(self, name: str) -> None:
        """Drain and unload a model, then forget it."""
        endpoint = self.resolve(name)
        endpoint.removing = True
        task = self._loading.get(endpoint.name)
        if task is not None:
            await asyncio.shield(task)
        async with self._lock:
            if endpoint.phase != Phase.UNLOADED:
                await self._unload(endpoint)
            self.endpoints.pop(endpoint.name, None)
            for alias in endpoint.entry.names:
                self._names.pop(alias, None)

    async def drain_all(self, timeout_s: float) -> None:
        await asyncio.gather(*(e.drain(timeout_s) for e in self.endpoints.values() if e.is_loaded))

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
        for task in self._loading.values():
            task.cancel()
        for endpoint in [*self.endpoints.values(), *self.upstreams.values()]:
            await endpoint.close()

    @property
    def num_unfinished(self) -> int:
        return sum(e.num_unfinished for e in self.endpoints.values() if e.is_loaded)
