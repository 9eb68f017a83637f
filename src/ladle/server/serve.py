"""Running the server: uvicorn with the engine loading beside it, warm-up, and a graceful drain.

The HTTP server starts first, so /health answers while the model loads; /ready turns 200 once the
model is loaded and warmed up. On SIGTERM /ready turns 503 and new requests get 503, requests in
flight run on for up to --drain-timeout seconds, the rest are aborted (finish reason "abort"),
and the process exits 0. A second signal, or SIGINT, drains without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

import uvicorn

from ladle.config import LadleConfig
from ladle.errors import LadleError
from ladle.metering.prometheus import ServerMetrics
from ladle.server.app import build_app
from ladle.server.state import Phase, ServerState

log = logging.getLogger("ladle.server")

WARMUP_PROMPT_LENGTHS = (8, 200)  # a short and a longer prefill, then a few decode steps each
WARMUP_OUTPUT_TOKENS = 4


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
        if state.phase != Phase.FAILED:
            state.phase = Phase.DRAINING
        engine = state.engine
        log.info("draining: %d requests in flight, up to %.0f s", engine.num_unfinished if engine else 0, timeout_s)
        deadline = time.monotonic() + timeout_s
        while engine is not None and engine.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine is not None and engine.num_unfinished:
            log.info("aborting %d requests still running after the drain timeout", engine.num_unfinished)
            engine.abort_all()
            stop_at = time.monotonic() + 5
            while engine.num_unfinished and time.monotonic() < stop_at:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # let the last responses flush
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


def make_lifespan(state: ServerState, server_ref: list):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(_load_and_warm(state, server_ref))
        try:
            yield
        finally:
            task.cancel()
            if state.engine is not None:
                state.engine.shutdown()

    return lifespan


async def _load_and_warm(state: ServerState, server_ref: list) -> None:
    cfg = state.config
    try:
        engine = await asyncio.to_thread(_build_async_engine, cfg)
    except LadleError as e:
        _fail(state, server_ref, str(e), 2)
        return
    except Exception as e:  # a bug: say so with the traceback
        log.exception("loading the model failed")
        _fail(state, server_ref, f"{type(e).__name__}: {e}", 1)
        return
    state.engine = engine
    state.metrics.attach_engine(lambda: engine.engine.stats, engine.engine.info.block_size)
    if state.phase == Phase.LOADING:
        state.phase = Phase.WARMING
    if cfg.server.warmup:
        await _warm_up(engine)
    if state.phase == Phase.WARMING:
        state.phase = Phase.READY
        info = engine.engine.info
        url = f"http://{cfg.server.host}:{cfg.server.port}"
        print(
            f"ladle: serving {info.model_name} ({info.weights_description} on {info.device}, "
            f"{info.attention_backend} attention, "
            f"KV cache {info.kv_capacity_tokens} tokens, context {info.max_model_len}) at {url}",
            file=sys.stderr,
            flush=True,
        )


def _build_async_engine(cfg: LadleConfig):
    from ladle.engine.async_engine import AsyncEngine
    from ladle.engine.llm import build_engine

    return AsyncEngine.launch(lambda: build_engine(cfg.engine))  # all tensor work on the engine's thread


async def _warm_up(engine) -> None:
    """Real forward passes of the shapes serving will see: prefills of two lengths and decodes."""
    from ladle.sample.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True)
    vocab = engine.engine.tokenizer.vocab_size

    async def one(i, length):
        ids = [(7 + 13 * j) % vocab for j in range(min(length, engine.engine.max_model_len - WARMUP_OUTPUT_TOKENS))]
        async for _ in engine.generate(f"warmup-{i}", ids, params):
            pass

    started = time.monotonic()
    await asyncio.gather(*(one(i, n) for i, n in enumerate(WARMUP_PROMPT_LENGTHS)))
    await engine.reset_prefix_cache()
    log.info("warm-up done in %.1f s", time.monotonic() - started)


def _fail(state: ServerState, server_ref: list, message: str, code: int) -> None:
    state.phase, state.failure, state.exit_code = Phase.FAILED, message, code
    print(f"ladle: error: {message}", file=sys.stderr, flush=True)
    if server_ref:
        server_ref[0].should_exit = True


def create_state(cfg: LadleConfig, model_name: str) -> ServerState:
    return ServerState(config=cfg, model_name=model_name, metrics=ServerMetrics(model_name))


def run(cfg: LadleConfig, model_name: str, log_level: str = "info") -> int:
    """Serve until drained; returns the process exit code."""
    state = create_state(cfg, model_name)
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
