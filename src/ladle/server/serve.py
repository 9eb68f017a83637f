"""Running the server: uvicorn with the models loading beside it, and a graceful drain.

The HTTP server starts first, so /health answers while the models load (a request for a model
still loading waits for it); /ready turns 200 once the models declared for the start are loaded
and warmed up. On SIGTERM /ready turns 503 and new requests get 503, requests in
flight run on for up to --drain-timeout seconds, the rest are aborted (finish reason "abort"),
and the process exits 0. A second signal, or SIGINT, drains without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

from ladle.config import LadleConfig
from ladle.engine.compute import ComputeLoop
from ladle.metering.ledger import Ledger
from ladle.metering.prometheus import ServerMetrics
from ladle.metering.store import Store
from ladle.router.endpoint import Phase
from ladle.router.registry import Registry
from ladle.router.router import Router
from ladle.server.app import build_app
from ladle.server.state import ServerPhase, ServerState

log = logging.getLogger("ladle.server")
GIL_SWITCH_INTERVAL_S = 0.0005


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a signal starts Ladle's drain instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.ladle = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.loop is None or self._drain_task is not None:
            self.should_exit = True  # a second signal: stop now
            self.force_exit = sig == signal.SIGINT
            return
        timeout = self.ladle.config.server.drain_timeout_s if sig == signal.SIGTERM else 0.0
        self.loop.call_soon_threadsafe(self._start_drain, timeout)

    def _start_drain(self, timeout_s: float) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain(timeout_s))

    async def drain(self, timeout_s: float) -> None:
        state = self.ladle
        if state.phase != ServerPhase.FAILED:
            state.phase = ServerPhase.DRAINING
        registry = state.registry
        log.info("draining: %d requests in flight, up to %.0f s", registry.num_unfinished, timeout_s)
        await registry.drain_all(timeout_s)
        await asyncio.sleep(0.1)  # let the last responses flush
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


def make_lifespan(state: ServerState, server_ref: list):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(_start_models(state, server_ref))
        try:
            yield
        finally:
            task.cancel()
            await state.registry.close()
            state.registry.compute.stop()
            state.close_sinks()

    return lifespan


async def _start_models(state: ServerState, server_ref: list) -> None:
    """Load the models declared for the start; the server is ready once they are. If none of them
    could load (none of its LLMs, where it has any), say why and exit (2 for a user error such as
    a corrupt file)."""
    registry = state.registry
    try:
        await registry.start()
    except Exception as e:  # a bug: fail loudly rather than never turning ready
        log.exception("starting the models failed")
        _fail(state, server_ref, f"{type(e).__name__}: {e}", 1)
        return
    starting = [e for e in registry.endpoints.values() if e.entry.load_at_start]
    # the server fails when its LLMs all failed (an embedding model beside them does not keep it up)
    vital = [e for e in starting if e.kind == "llm"] or starting
    failed = [e for e in vital if e.phase == Phase.FAILED]
    if vital and len(failed) == len(vital):
        message = (
            "; ".join(e.failure for e in failed)
            if len(failed) == 1
            else "; ".join(f"{e.name}: {e.failure}" for e in failed)
        )
        _fail(state, server_ref, message, 1 if any(e.failed_by_bug for e in failed) else 2)
        return
    if state.phase == ServerPhase.LOADING:
        state.phase = ServerPhase.READY
        url = f"http://{state.config.server.host}:{state.config.server.port}"
        for e in starting:
            if e.phase == Phase.READY:
                print(f"ladle: serving {e.summary()} at {url}", file=sys.stderr, flush=True)
            else:
                print(f"ladle: model {e.name} failed to load: {e.failure}", file=sys.stderr, flush=True)


def _fail(state: ServerState, server_ref: list, message: str, code: int) -> None:
    state.phase, state.failure, state.exit_code = ServerPhase.FAILED, message, code
    print(f"ladle: error: {message}", file=sys.stderr, flush=True)
    if server_ref:
        server_ref[0].should_exit = True


def attach_metering(state: ServerState, store: Store) -> ServerState:
    """The tenants loaded from the store, and the ledger writing to it (unless --no-ledger)."""
    cfg = state.config.metering
    state.store = store
    state.directory = store.load_directory()
    if cfg.ledger:
        state.ledger = Ledger(state.store, cfg.flush_interval_s)
        state.sinks.append(state.ledger)
    return state


def create_state(cfg: LadleConfig) -> ServerState:
    metrics = ServerMetrics()
    compute = ComputeLoop().start()

    def loaded(endpoint) -> None:
        if endpoint.kind == "llm":  # engine stats read at scrape time; batchers report per batch
            metrics.attach_engine(endpoint.name, lambda: endpoint.stats, endpoint.info.block_size)

    registry = Registry(
        cfg,
        compute,
        warmup=cfg.server.warmup,
        on_loaded=loaded,
        on_unloaded=lambda e: metrics.detach_engine(e.name),
        observe_batch=metrics.observe_batch,
    )
    return ServerState(config=cfg, metrics=metrics, registry=registry, router=Router(cfg, registry))


def run(cfg: LadleConfig, log_level: str = "info") -> int:
    """Serve until drained; returns the process exit code."""
    # The event loop (HTTP, JSON) and the compute thread share the GIL: at the default 5 ms switch
    # interval a busy loop makes the compute thread wait up to 5 ms each time it takes the GIL back
    # between two torch ops, which stretched an LLM step beside 64 embedding clients many times over.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    store = Store.open(cfg.metering)  # a bad --database fails here, before any model loads
    state = attach_metering(create_state(cfg), store)
    server_ref: list = []
    app = build_app(state, lifespan=make_lifespan(state, server_ref))
    uv_config = uvicorn.Config(
        app,
        host=cfg.server.host,
        port=cfg.server.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = DrainingServer(uv_config, state)
    server_ref.append(server)
    server.run()
    return state.exit_code
